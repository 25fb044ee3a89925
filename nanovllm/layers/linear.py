"""Linear layers split for tensor parallelism.

Each parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that copies this
rank's slice of a checkpoint tensor into it, so the model loader stays a short loop and no rank
ever holds more than its own shard.

- Column parallel: the output features are split; each rank computes its slice, no communication.
- Row parallel: the input features are split; each rank's partial product is summed (all-reduce).
- Merged / QKV: several checkpoint tensors (gate+up, q+k+v) packed into one column-parallel matmul.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import all_reduce, tp_rank, tp_size
from nanovllm.utils.loader import expect_shape


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_dim, self.tp_rank, self.tp_size = tp_dim, tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        split = self.tp_dim is not None and param.dim() > self.tp_dim  # a row-parallel bias is not split
        full = [n * self.tp_size if split and d == self.tp_dim else n for d, n in enumerate(param.shape)]
        expect_shape(loaded, full)
        if split:
            size = param.shape[self.tp_dim]
            loaded = loaded.narrow(self.tp_dim, self.tp_rank * size, size)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp = tp_size()
        if output_size % tp:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size={tp}")
        super().__init__(input_size, output_size // tp, bias, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj and up_proj -> gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        expect_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, split by heads. With more ranks than KV heads, each KV
    head is replicated on ``tp_size // num_kv_heads`` consecutive ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ):
        tp = tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_head_offset = tp_rank() * num_kv_heads // tp  # first KV head of this rank
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out * tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        expect_shape(loaded, (heads * self.head_dim, *param.shape[1:]))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, self.kv_head_offset * self.head_dim
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp = tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size={tp}")
        super().__init__(input_size // tp, output_size, bias, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce sums it exactly once.
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y)
