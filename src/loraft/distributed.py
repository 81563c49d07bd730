"""Several processes training one model with PyTorch DistributedDataParallel, launched by `torchrun`.

`torchrun --nproc-per-node N -m loraft train ...` starts N copies of the command with RANK, WORLD_SIZE
and a rendezvous address in their environment; `setup` joins them into one process group (gloo for
CPU tensors, NCCL for CUDA ones). Every process runs the same loop on its share of each global batch;
process 0 alone writes logs, checkpoints, adapters and reports.
"""

import dataclasses
import os

import torch
import torch.distributed as dist


def world_size_requested() -> int:
    """How many processes torchrun started, known before `setup` joins them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup():
    """Join the process group when started by torchrun with more than one process; else do nothing."""
    if world_size_requested() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def sum_over_processes(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def shard(batch):
    """This process's rows of a global batch (a dataclass of tensors with one row per example), and
    how many they are. Rows are dealt out in turn (a batch is sorted by length, so every process
    gets long and short ones). A process left without a row gets the first row to be weighted by
    zero: every process must take part in each gradient all-reduce."""
    n, r, world = len(batch.labels), rank(), world_size()
    if world == 1:
        return batch, n
    count = len(range(r, n, world))
    rows = slice(r, n, world) if count else slice(0, 1)
    tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(
        batch, **{k: v[rows] for k, v in tensors.items() if torch.is_tensor(v) and v.dim() and len(v) == n}
    ), count
