#!/usr/bin/env bash
# Launch any CheaperTraining entry point with torchrun, single node or multi-node.
#
#   Single node:  NPROC=8 tools/launch/torchrun.sh -m ct_cli.train distributed=megatron_tp2 ...
#   Multi-node (run on every node, same MASTER_ADDR/PORT, NODE_RANK 0..NNODES-1):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 tools/launch/torchrun.sh -m ct_cli.train ...
#
# The process group is created by ct_parallel.init_distributed from torchrun's variables
# (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); backend nccl on GPUs, gloo on CPU.
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 1)")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# After SIGTERM, how long torchrun's ranks get to finish their step and checkpoint before SIGKILL
# (torch's default, 30 s, is too short for a large model): the scheduler's warning lead time.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}
# megatron-core wants one CUDA connection per device for its TP/SP comm/compute ordering.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --shutdown-timeout "$SHUTDOWN_TIMEOUT" "$@"
