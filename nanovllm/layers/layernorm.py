import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. With ``residual`` it first adds it (the fused residual-add form)
    and returns ``(normed, new_residual)``, so the decoder layer never materialises the sum twice."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        dtype = x.dtype
        if residual is None:
            return self._norm(x.float(), dtype)
        residual = x + residual  # rounded to the model dtype first, as HF does
        return self._norm(residual.float(), dtype), residual
