"""Runs the model: builds each step's input tensors, owns the KV cache, samples."""

import logging

import torch

from nanovllm.config import Config
from nanovllm.distributed import min_over_ranks
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import Attention, get_backend
from nanovllm.layers.sampler import Sampler, SamplingMetadata
from nanovllm.models.llama import head_dim_of
from nanovllm.models.registry import model_class
from nanovllm.utils.context import Context, forward_context
from nanovllm.utils.loader import iter_safetensors, load_weights
from nanovllm.utils.memory import cpu_kv_cache_blocks

logger = logging.getLogger("nanovllm")


class ModelRunner:
    def __init__(self, config: Config, rank: int = 0):
        self.config = config
        self.rank = rank
        hf = config.hf_config
        self.block_size = config.kvcache_block_size
        self.device = torch.device(config.device, rank) if config.device == "cuda" else torch.device("cpu")
        self.dtype = config.torch_dtype
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)

        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(hf)(hf)
        finally:
            torch.set_default_dtype(default_dtype)
        load_weights(self.model, self._weights())
        self.model.eval().requires_grad_(False)
        self.backend = get_backend(config.attention_backend, config.device, self.block_size)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in self.attention_layers:
            layer.backend = self.backend
        self.sampler = Sampler()
        self.eos_token_ids: list[int] = []  # set by the engine; min_tokens holds these back

        self.num_kv_heads = self.attention_layers[0].num_kv_heads
        self.head_dim = head_dim_of(hf)
        self.num_blocks = self._allocate_kv_cache()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, config, self.device)

    def _weights(self):
        if self.config.is_gguf:
            from nanovllm.utils.gguf import iter_gguf_weights

            return iter_gguf_weights(self.config.model, self.config.quantization)
        return iter_safetensors(self.config.model)

    # ---- KV cache ------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block over all layers (K and V) on this rank."""
        n = len(self.attention_layers) * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return n * self.dtype.itemsize

    def _allocate_kv_cache(self) -> int:
        """Size and allocate the cache; returns the number of blocks.

        Layout: one tensor [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]; layer i
        reads ``kv_cache[0, i]`` (K) and ``kv_cache[1, i]`` (V).
        """
        cfg = self.config
        if cfg.num_kvcache_blocks > 0:
            num_blocks = cfg.num_kvcache_blocks
        elif self.device.type == "cuda":
            num_blocks = self._blocks_that_fit_on_gpu()
        else:
            num_blocks = cpu_kv_cache_blocks(
                self.block_bytes, self.block_size, cfg.max_num_seqs, cfg.max_model_len
            )
        num_blocks = min_over_ranks(num_blocks)  # one block table serves every rank
        if num_blocks * self.block_size < cfg.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {self.block_size} tokens = "
                f"{num_blocks * self.block_size} tokens, fewer than one sequence of max_model_len="
                f"{cfg.max_model_len}; raise num_kvcache_blocks (or gpu_memory_utilization) "
                "or lower max_model_len"
            )
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        gib = num_blocks * self.block_bytes / (1 << 30)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB",
            num_blocks,
            self.block_size,
            num_blocks * self.block_size,
            gib,
        )
        return num_blocks

    def _blocks_that_fit_on_gpu(self) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` of the card after a warm-up forward at
        ``max_num_batched_tokens`` has shown the activations' peak."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = self.config
        num_seqs = max(1, min(cfg.max_num_batched_tokens // cfg.max_model_len, cfg.max_num_seqs))
        seqs = [Sequence([0] * cfg.max_model_len, _WARMUP_PARAMS, self.block_size) for _ in range(num_seqs)]
        self.run_prefill_without_cache(seqs)
        torch.cuda.synchronize()
        peak = torch.cuda.memory_stats()["allocated_bytes.all.peak"]
        torch.cuda.empty_cache()  # the warm-up's freed blocks must not count as used
        free, total = torch.cuda.mem_get_info()
        used = total - free
        current = torch.cuda.memory_stats()["allocated_bytes.all.current"]
        budget = total * cfg.gpu_memory_utilization - used - peak + current
        self.kv_budget_bytes = int(budget)
        self.memory_profile = {  # GiB, for the start-up log and the benchmark record
            "total": total / 2**30,
            "weights_and_buffers": current / 2**30,
            "activation_peak": (peak - current) / 2**30,
            "outside_torch": (used - current) / 2**30,
        }
        logger.info("memory (GiB): %s", {k: round(v, 2) for k, v in self.memory_profile.items()})
        return max(0, int(budget) // self.block_bytes)

    @torch.inference_mode()
    def run_prefill_without_cache(self, seqs: list[Sequence]) -> None:
        input_ids, positions, context = self.prepare_prefill(seqs)
        with forward_context(context):
            self.model.compute_logits(self.model(input_ids, positions))

    # ---- inputs --------------------------------------------------------------------------

    def _to_device(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._to_device(
            [s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32
        )

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        input_ids, positions, slot_mapping, cu_seqlens_q, context_lens = [], [], [], [0], []
        max_seqlen_q = 0
        bs = self.block_size
        for seq in seqs:
            start, end = seq.num_cached_tokens, seq.num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            context_lens.append(end)
            max_seqlen_q = max(max_seqlen_q, end - start)
            if seq.block_table:
                for i in range(start // bs, seq.num_blocks):
                    base = seq.block_table[i] * bs
                    lo, hi = max(start, i * bs), min(end, (i + 1) * bs)
                    slot_mapping.extend(range(base + lo - i * bs, base + hi - i * bs))
        context = Context(
            is_prefill=True,
            cu_seqlens_q=self._to_device(cu_seqlens_q, torch.int32),
            max_seqlen_q=max_seqlen_q,
            context_lens=self._to_device(context_lens, torch.int32),
            max_context_len=max(context_lens),
            block_tables=self._block_tables(seqs) if seqs[0].block_table else None,
            slot_mapping=self._to_device(slot_mapping, torch.int64) if slot_mapping else None,
        )
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), context

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, Context]:
        bs = self.block_size
        input_ids = [s.last_token for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [s.block_table[(s.num_tokens - 1) // bs] * bs + (s.num_tokens - 1) % bs for s in seqs]
        context_lens = [s.num_tokens for s in seqs]
        context = Context(
            is_prefill=False,
            context_lens=self._to_device(context_lens, torch.int32),
            max_context_len=self.config.max_model_len,  # as in the CUDA graphs: same kernel split
            block_tables=self._block_tables(seqs),
            slot_mapping=self._to_device(slots, torch.int64),
        )
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), context

    # ---- forward -------------------------------------------------------------------------

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, context: Context) -> torch.Tensor:
        graphs = self.graphs
        with forward_context(context):
            if context.is_prefill or graphs is None or not graphs.fits(input_ids.shape[0]):
                hidden = self.model(input_ids, positions)
            else:
                hidden = graphs.replay(input_ids, positions, context)
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list | None]:
        """One engine step: forward the scheduled sequences and sample one token for each.

        Returns the token ids and, when some sequence asked for them, per-row logprobs dicts."""
        prepare = self.prepare_prefill if is_prefill else self.prepare_decode
        input_ids, positions, context = prepare(seqs)
        metadata = None
        if self.rank == 0:  # built before the forward so its host-to-device copies overlap it
            metadata = SamplingMetadata.build(
                seqs, self.config.hf_config.vocab_size, self.device, self.eos_token_ids
            )
        logits = self.run_model(input_ids, positions, context)
        if self.rank != 0:
            return [], None
        out = self.sampler(logits, metadata)
        return out.token_ids.tolist(), out.logprobs

    def shutdown(self) -> None:
        self.graphs = None
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = None
        self.kv_cache = None


class _WarmupParams:
    temperature = 0.0
    max_tokens = 1
    ignore_eos = True


_WARMUP_PARAMS = _WarmupParams()
