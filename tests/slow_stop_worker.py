"""A worker that needs STOP_S seconds after SIGTERM (a checkpoint being written) before it can
exit: marks OUT/rank{r}.ready once its handler is set, waits for SIGTERM, works STOP_S seconds,
then marks OUT/rank{r}.done and exits 143, as ct-train's ranks do. No torch import: it starts fast.

    python slow_stop_worker.py OUT STOP_S      (under an elastic launcher)
"""

import signal
import sys
import time
from os import environ
from pathlib import Path

out, stop_s = Path(sys.argv[1]), float(sys.argv[2])
rank = environ["RANK"]
terminated = []
signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
(out / f"rank{rank}.ready").touch()
while not terminated:
    time.sleep(0.05)
time.sleep(stop_s)
(out / f"rank{rank}.done").touch()
sys.exit(143)
