"""Linear layers split for tensor parallelism.

Each parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that copies this
rank's slice of a checkpoint tensor into it, so the model loader stays a short loop and no rank
ever holds more than its own shard.

- Column parallel: the output features are split; each rank computes its slice, no communication.
- Row parallel: the input features are split; each rank's partial product is summed (all-reduce).
- Merged / QKV: several checkpoint tensors (gate+up, q+k+v) packed into one column-parallel matmul.

With ``quant_type`` (a GGUF block format, see layers/quantization.py) the weight parameter holds the
checkpoint's raw block bytes, uint8 ``[out_features, row_bytes]``, which slice by rows like the float
weight; once every shard has arrived they are packed for torch's int4 kernel and the parameter is emptied.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import all_reduce, tp_rank, tp_size
from nanovllm.layers.quantization import PackedWeight, row_bytes
from nanovllm.utils.loader import expect_shape


class LinearBase(nn.Module):
    num_shards = 1  # checkpoint tensors that make up the weight

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp_dim: int | None, quant_type: str | None = None
    ):
        super().__init__()
        self.tp_dim, self.tp_rank, self.tp_size = tp_dim, tp_rank(), tp_size()
        self.quant_type, self.packed = quant_type, None
        if quant_type is None:
            weight = torch.empty(output_size, input_size)
        else:
            if self.tp_size > 1:
                raise ValueError("packed quantised weights need tensor_parallel_size=1")
            weight = torch.empty(output_size, row_bytes(quant_type, input_size), dtype=torch.uint8)
            self.shards_missing = self.num_shards
        self.weight = nn.Parameter(weight, requires_grad=False)
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
        self.shard_loaded(param)

    def shard_loaded(self, param: nn.Parameter) -> None:
        """Pack the raw block bytes once the last shard of a quantised weight is in."""
        if self.quant_type is None or param is not self.weight:
            return
        self.shards_missing -= 1
        if self.shards_missing == 0:
            self.packed = PackedWeight(self.weight.data, self.quant_type)
            self.weight.data = torch.empty(0, dtype=torch.uint8)

    def takes_gemv(self, x: torch.Tensor) -> bool:
        """Whether ``linear`` runs the Triton GEMV on ``x`` (kernels/gemv.py: a CUDA step of a few
        rows with a float weight); only then does it accept ``act``."""
        if self.packed is not None or not x.is_cuda:
            return False
        from nanovllm.kernels import gemv

        return gemv.gemv_eligible(x, self.weight)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, act: str | None = None) -> torch.Tensor:
        if self.takes_gemv(x):
            from nanovllm.kernels import gemv

            return gemv.gemv(x, self.weight, act=act, bias=bias)
        if act is not None:
            raise ValueError(f"act={act!r} is fused only on the GEMV path; check takes_gemv(x) first")
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        y = self.packed.matmul(x)
        return y if bias is None else y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def norm_forward(
        self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm`` (an RMSNorm: with the residual added first, unless it is None) and then this
        projection: ``(y, new_residual)``. On the GEMV path the norm is the kernel's prologue
        (``gemv.gemv_rms_norm``), one launch instead of two; a column-parallel layer only (its
        forward has no all-reduce)."""
        if self.takes_gemv(x) and norm.weight.dtype == x.dtype:
            from nanovllm.kernels import gemv

            return gemv.gemv_rms_norm(x, residual, norm.weight, norm.eps, self.weight, bias=self.bias)
        h, residual = (norm(x), x) if residual is None else norm(x, residual)
        return self(h), residual


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_type: str | None = None):
        super().__init__(input_size, output_size, bias, tp_dim=None, quant_type=quant_type)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_type: str | None = None):
        tp = tp_size()
        if output_size % tp:
            raise ValueError(f"output size {output_size} is not divisible by tensor_parallel_size={tp}")
        super().__init__(input_size, output_size // tp, bias, tp_dim=0, quant_type=quant_type)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj and up_proj -> gate_up_proj)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, quant_type: str | None = None
    ):
        self.output_sizes = output_sizes
        self.num_shards = len(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, quant_type)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        expect_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))
        self.shard_loaded(param)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, split by heads. With more ranks than KV heads, each KV
    head is replicated on ``tp_size // num_kv_heads`` consecutive ranks."""

    num_shards = 3

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        quant_type: str | None = None,
    ):
        tp = tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_head_offset = tp_rank() * num_kv_heads // tp  # first KV head of this rank
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out * tp, bias, quant_type)

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
        self.shard_loaded(param)


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, quant_type: str | None = None):
        tp = tp_size()
        if input_size % tp:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size={tp}")
        super().__init__(input_size // tp, output_size, bias, tp_dim=1, quant_type=quant_type)

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        # The bias is added once, on rank 0, so the all-reduce sums it exactly once.
        y = self.linear(x, self.bias if self.tp_rank == 0 else None, act)
        return all_reduce(y)
