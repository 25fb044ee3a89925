import math
from functools import lru_cache

import torch
from torch import nn

from nanovllm.utils.compile import compile_on_cuda
from nanovllm.utils.context import get_context


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths are slowed by ``factor``,
    short ones kept, and the band between is interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half (GPT-NeoX) layout that HF Llama/Qwen use.

    The cos/sin table for every position up to ``max_position`` is built once, in float32, and
    shared by every layer (see ``get_rope``).
    """

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind not in ("default", None):
            raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, llama3)")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()  # float32 whatever the default dtype
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._step: tuple | None = None  # CPU: (Context, positions, cos, sin) of the current forward

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.is_cuda:
            return apply_rotary(q, k, positions, self.cos_sin_cache)
        cos, sin = self._cpu_cos_sin(positions)
        return _rotate_cpu(q, cos, sin), _rotate_cpu(k, cos, sin)

    def _cpu_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_tokens, 1, head_dim] ``[cos, cos]`` and ``[-sin, sin]`` of ``positions``, looked up once
        per forward and shared by every layer (the module is shared, see ``get_rope``). A forward is
        recognised by its Context object and its positions tensor: both are new for every step."""
        ctx = get_context()
        if self._step is None or self._step[0] is not ctx or self._step[1] is not positions:
            cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
            self._step = (ctx, positions, torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1))
        return self._step[2], self._step[3]


@lru_cache(maxsize=8)
def _get_rope(head_dim: int, max_position: int, base: float, scaling_items: tuple | None, device: str):
    scaling = dict(scaling_items) if scaling_items is not None else None
    with torch.device(device):
        return RotaryEmbedding(head_dim, max_position, base, scaling)


def get_rope(head_dim: int, max_position: int, base: float, scaling: dict | None = None) -> RotaryEmbedding:
    """One shared RotaryEmbedding per configuration (its table is ~20 MB at 40k positions)."""
    items = (
        tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
        if scaling
        else None
    )
    device = str(torch.empty(0).device)
    return _get_rope(head_dim, max_position, float(base), items, device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _rotate_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * [cos, cos] + [x2, x1] * [-sin, sin]``: the same products and sums as ``_rotate`` (and HF's
    rotate_half), in four ops; ``[x2, x1]`` is the two halves swapped by one flip."""
    xf = x.float()
    swapped = xf.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return (xf * cos).add_(swapped.mul_(sin)).to(x.dtype)


@compile_on_cuda
def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
