"""ct-train's local launcher (``--nproc-per-node``) on SIGTERM: the workers get
``--shutdown-timeout`` seconds to checkpoint before SIGKILL (torch's default, 30 s, is too short
for a large model's checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "slow_stop_worker.py"
STOP_S = 3  # what each worker needs after SIGTERM


def launch_and_terminate(out: Path, grace_s: int) -> subprocess.CompletedProcess:
    """ct-train's launcher over two slow-to-stop workers; SIGTERM once both are ready."""
    code = ("import sys; from ct_cli.train import launch_local; "
            f"sys.exit(launch_local(2, [{str(out)!r}, '{STOP_S}'], {grace_s}, entry=({str(WORKER)!r},)))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((out / f"rank{r}.ready").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("grace_s, finishes", [(1, False), (30, True)])
def test_sigterm_gives_the_workers_the_shutdown_timeout(tmp_path, grace_s, finishes):
    """A grace shorter than the worker needs (1 s, standing in for torch's 30 s default) kills
    them mid-checkpoint; one that covers it lets both finish. Either way the launcher exits 143."""
    result = launch_and_terminate(tmp_path, grace_s)
    assert result.returncode == 143, result.stderr[-3000:]
    done = [(tmp_path / f"rank{r}.done").exists() for r in (0, 1)]
    assert done == [finishes, finishes], result.stderr[-3000:]
    assert f"up to {grace_s} s" in result.stderr


def test_the_cli_passes_the_shutdown_timeout_to_the_launcher(monkeypatch):
    """--shutdown-timeout, else $TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 120 s, reaches torchrun;
    neither launcher flag reaches the workers' command line."""
    import torch.distributed.run

    from ct_cli import train as train_cli

    calls = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda args: calls.append(args))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    base = ["--phase", "pretrain_phase1", "trainer.max_steps=2", "distributed=ddp"]
    assert train_cli.main(["--nproc-per-node", "2", *base]) == 0
    assert train_cli.main(["--nproc-per-node=2", "--shutdown-timeout", "300", *base]) == 0
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "45")
    assert train_cli.main([*base, "--nproc-per-node", "2"]) == 0
    assert train_cli.main([*base, "--shutdown-timeout=7", "--nproc-per-node", "2"]) == 0
    workers = ["-m", "ct_cli.train", *base]
    assert calls == [["--standalone", "--nproc-per-node=2", f"--shutdown-timeout={s}", *workers]
                     for s in (120, 300, 45, 7)]


def test_a_bad_shutdown_timeout_is_a_user_error(monkeypatch, capsys):
    from ct_cli import train as train_cli

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "soon")
    assert train_cli.main(["--nproc-per-node", "2", "--phase", "pretrain_phase1", "distributed=ddp"]) == 2
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT='soon'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(["--nproc-per-node", "2", "--shutdown-timeout", "-1"])
    assert "must be >= 0 seconds" in capsys.readouterr().err


ROOT = HERE.parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("grace_s, finishes", [(1, False), (30, True)])
def test_torchrun_sh_gives_its_workers_SHUTDOWN_TIMEOUT(tmp_path, grace_s, finishes):
    """tools/launch/torchrun.sh passes $SHUTDOWN_TIMEOUT to torchrun: 1 s kills the workers
    mid-checkpoint (torch's own 30 s would not), 30 s lets them finish."""
    env = {**os.environ, "NPROC": "2", "MASTER_PORT": str(_free_port()), "SHUTDOWN_TIMEOUT": str(grace_s)}
    proc = subprocess.Popen(["bash", str(ROOT / "tools/launch/torchrun.sh"), str(WORKER), str(tmp_path), str(STOP_S)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"rank{r}.ready").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the script exec'd torchrun: this is its agent
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert [(tmp_path / f"rank{r}.done").exists() for r in (0, 1)] == [finishes, finishes], stderr[-3000:]


@pytest.mark.parametrize("exported, expected", [(None, "120"), ("600", "600")])
def test_slurm_sbatch_passes_the_signal_lead_time_to_torchrun(tmp_path, exported, expected):
    """slurm.sbatch with stand-ins for srun/scontrol/nvidia-smi: torchrun gets --shutdown-timeout
    equal to the script's --signal lead time (120), or the exported SHUTDOWN_TIMEOUT."""
    script = (ROOT / "tools/launch/slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@120" in script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": f'echo "$@" > {tmp_path}/srun_args', "scontrol": "echo node0",
                       "nvidia-smi": "echo GPU 0"}.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node0",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "7"}
    env.pop("SHUTDOWN_TIMEOUT", None)
    if exported:
        env["SHUTDOWN_TIMEOUT"] = exported
    subprocess.run(["bash", str(ROOT / "tools/launch/slurm.sbatch"), "-m", "ct_cli.train"], cwd=tmp_path, env=env,
                   check=True, timeout=60)
    args = (tmp_path / "srun_args").read_text().split()
    assert args[args.index("--shutdown-timeout") + 1] == expected
    assert args[-2:] == ["-m", "ct_cli.train"]
