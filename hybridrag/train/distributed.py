"""torch.distributed plumbing for the trainer: the process group under torchrun, and sums across ranks.

Under `torchrun --nproc_per_node N ...` (WORLD_SIZE > 1 in the environment) the trainer joins the process group itself
with gloo for CPU and NCCL for CUDA, unless the caller already did (dist.init_process_group before the trainer).
"""
import os

import torch
import torch.distributed as dist


def setup(device):
    """(rank, world_size, device) for this process, joining the process group when torchrun launched it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    if not dist.is_initialized():
        return 0, 1, torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    if dist.get_backend() != "gloo":
        raise ValueError(f"device='cpu' needs the gloo backend, but the process group uses {dist.get_backend()!r}")
    return rank, world, torch.device(device)


def all_sum(values, device, world):
    """The element-wise sum over ranks of a list of floats (float64), as a list; the list itself when world == 1."""
    if world == 1:
        return list(values)
    device = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value, world):
    """[value of rank 0, rank 1, ...] (every rank gets the list)."""
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def barrier(world):
    if world > 1:
        dist.barrier()
