import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.compile import compile_on_cuda


@compile_on_cuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x.to(dtype) * weight


@compile_on_cuda
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual  # rounded to the model dtype first, as HF does
    dtype = residual.dtype
    y = residual.float()
    y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(dtype) * weight, residual


def _cpu_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The float32 CPU path: torch's fused rms_norm kernel, one op instead of seven. Same arithmetic as
    ``rms_norm`` (float32 throughout, the weight applied last), so HF parity is unchanged."""
    if residual is None:
        return F.rms_norm(x, weight.shape, weight, eps)
    residual = x + residual
    return F.rms_norm(residual, weight.shape, weight, eps), residual


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. With ``residual`` it first adds it (the fused residual-add form)
    and returns ``(normed, new_residual)``, so the decoder layer never materialises the sum twice."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not x.is_cuda and x.dtype == torch.float32 == self.weight.dtype:
            return _cpu_rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
