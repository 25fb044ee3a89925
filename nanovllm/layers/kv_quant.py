"""KV cache dtypes: which one the cache has, whether this machine can hold it, and fp8's scales.

"auto" is the model dtype, except on a CPU with packed GGUF weights (``quantization="gguf"``), where it
is float16 (llama.cpp's default cache type; the C kernels store and read halves, Config resolves it).
"float32", "bfloat16" and "float16" name a cache dtype outright.

``kv_cache_dtype="fp8"`` stores K and V as ``float8_e4m3fn`` (1 byte per element, the format Hopper
reads natively) holding ``x / scale``; every attention layer owns two float32 scales, ``k_scale``
and ``v_scale``, kept as 1-element tensors so that CUDA graphs read their current values. A scale is
either 1.0 (vLLM's default) or set once from the first prefill that reaches the cache
(``calculate_kv_scales``), before that prefill writes anything: every cached value of a layer is
then read back with the scale it was written with, prefix-cache hits included.
"""

import torch

from nanovllm.config import KV_CACHE_DTYPES
from nanovllm.kernels.reference import FP8_MAX

_FLOAT_CACHES = ("float32", "bfloat16", "float16")
# A calibrated scale maps |x| = amax * HEADROOM to 448: values up to that many times larger than
# the first prefill's largest still fit before saturating. Scales 1.0 are the default: on the
# quality check (benchmarks/quality_fp8.py, SmolLM2, full run) they changed the text's
# log-likelihood by -0.0010 nats/token against -0.0088 for calibrated scales (headroom 2), and kept
# 16 of 32 replies' first 32 tokens against 7; a first prefill likely under-estimates later
# inputs. e4m3's range (2^-9 .. 448) already covers the K/V of the
# models we run at scale 1.0 (scales 0.1 .. 10 all stayed within 0.005 nats/token).
CALIBRATION_HEADROOM = 2.0
MIN_SCALE = 1e-6  # an all-zero first prefill must not give a zero scale (x / 0)


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type: the model's for "auto", float8_e4m3fn for "fp8", else the named one."""
    if kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in _FLOAT_CACHES:
        return getattr(torch, kv_cache_dtype)
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


def resolve_auto_kv_cache_dtype(quantization: str | None, model_dtype: str) -> tuple[str, str]:
    """What "auto" becomes, and why (for the start-up log)."""
    if quantization == "gguf":
        return "float16", "packed GGUF weights on the CPU: half the K/V bytes of float32, as llama.cpp"
    return model_dtype, "the model dtype"


def check_kv_cache_dtype(kv_cache_dtype: str, device: str, attention_backend: str) -> None:
    """Raise a ValueError naming the problem and the fix if this torch build, GPU or attention
    backend cannot hold the asked-for cache."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if kv_cache_dtype != "fp8":
        return
    if not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(
            f"kv_cache_dtype='fp8' needs torch.float8_e4m3fn, which this torch ({torch.__version__}) "
            "lacks; install torch >= 2.1 or use kv_cache_dtype='auto'"
        )
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise ValueError(
                f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper), "
                f"but {torch.cuda.get_device_name()} is {major}.{minor}; use kv_cache_dtype='auto'"
            )
    if attention_backend == "flash-attn":
        raise ValueError(
            "the flash-attn backend cannot read an fp8 KV cache; use attention_backend='triton' "
            "(or 'auto') with kv_cache_dtype='fp8'"
        )


@torch.no_grad()
def calibrate_kv_scales(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], this step's new keys
    value: torch.Tensor,
    k_scale: torch.Tensor,  # [1] float32, set in place
    v_scale: torch.Tensor,
    headroom: float | None = None,  # None: CALIBRATION_HEADROOM
) -> None:
    """Set the scales from this step's largest |K| and |V| (in place, on the device: no host sync)."""
    headroom = CALIBRATION_HEADROOM if headroom is None else headroom
    for x, scale in ((key, k_scale), (value, v_scale)):
        amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
        scale.copy_((amax * (headroom / FP8_MAX)).clamp(min=MIN_SCALE).reshape(1))
