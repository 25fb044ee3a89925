"""Tensor-parallel group helpers. With one rank every helper is a no-op, so layers need no special case."""

import torch
import torch.distributed as dist


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def gather_to_rank0(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate every rank's ``x`` along ``dim`` on rank 0; other ranks get None."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=dim) if parts is not None else None


# ---- process group lifecycle (used by nanovllm.engine.parallel) -------------------------------


def init_tensor_parallel(rank: int, world_size: int, store: dist.Store, device: str) -> None:
    """Join the tensor-parallel group: NCCL on CUDA (rank r drives cuda:r), gloo on the CPU."""
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group already exists in this process; "
            "shut down the other tensor-parallel engine first"
        )
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def min_over_ranks(n: int) -> int:
    """The smallest ``n`` over all ranks (every rank must call it); ``n`` itself with one rank."""
    if tp_size() == 1:
        return n
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
