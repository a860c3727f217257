"""The worker of test_muon's spreading test: 2 gloo ranks step row-sharded DTensors (FSDP2's
layout) with MuonWithAdamW. A module of its own so that ``torch.multiprocessing.spawn`` can
import it in the child processes."""

import torch

from ct_stages.muon import MuonWithAdamW


# Row counts that shard unevenly over 2 ranks ([3, 2], [1, 0]: one rank's shard is empty) and 3
# matrices, so the second round has one matrix (rank 1 owns nothing in it).
SPREAD = [((5, 8), 1), ((1, 6), 1), ((3, 8, 6), 2)]


def spread_worker(rank: int, store: str, out: str) -> None:
    """One of 2 gloo ranks: the SPREAD matrices as row-sharded DTensors (FSDP2's layout), 3 Muon
    steps with seeded gradients; rank 0 saves the full parameters and each rank's NS count."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ct_stages.muon as muon

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    calls = []
    real = muon.orthogonalised
    muon.orthogonalised = lambda update, *a: calls.append(tuple(update.shape)) or real(update, *a)
    params, grads = spread_problem()
    shard = [Shard(0)]
    dparams = [torch.nn.Parameter(distribute_tensor(p, mesh, shard)) for p in params]
    opt = MuonWithAdamW([{"params": [p], "muon": True, "split": split, "weight_decay": 0.1}
                         for p, (_, split) in zip(dparams, SPREAD)], lr=0.05)
    for step_grads in grads:
        for p, g in zip(dparams, step_grads):
            p.grad = distribute_tensor(g, mesh, shard)
        opt.step()
    full = [p.full_tensor() for p in dparams]
    counts = [None, None]
    dist.all_gather_object(counts, calls)
    if rank == 0:
        torch.save({"params": full, "calls": counts}, out)
    dist.destroy_process_group()


def spread_problem():
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(shape, generator=g) for shape, _ in SPREAD]
    grads = [[torch.randn(shape, generator=g) for shape, _ in SPREAD] for _ in range(3)]
    return params, grads
