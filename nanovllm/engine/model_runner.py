"""Runs the model for one step: keeps each scheduled sequence's tokens and block table between
steps, builds the step's input tensors from the ``SchedulerOutput``, owns the KV cache, samples.

Every rank runs one; only rank 0 samples (the logits are gathered to it).
"""

import logging

import torch

from nanovllm.config import Config
from nanovllm.distributed import min_over_ranks
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.step import ModelRunnerOutput, NewSeq, SchedulerOutput
from nanovllm.layers.attention import Attention, get_backend
from nanovllm.layers.kv_quant import kv_cache_torch_dtype
from nanovllm.layers.sampler import Sampler, SamplingMetadata
from nanovllm.models.llama import head_dim_of
from nanovllm.models.registry import model_class
from nanovllm.utils.context import Context, forward_context
from nanovllm.utils.loader import iter_safetensors, load_weights
from nanovllm.utils.memory import cpu_kv_cache_blocks

logger = logging.getLogger("nanovllm")


class SeqState:
    """What a runner keeps of one sequence between steps (the scheduler sends only changes)."""

    __slots__ = ("token_ids", "num_prompt_tokens", "block_table", "num_computed_tokens", "sampling_params")

    def __init__(self, new: NewSeq):
        self.token_ids = list(new.token_ids)
        self.num_prompt_tokens = new.num_prompt_tokens
        self.block_table = list(new.block_ids)
        self.num_computed_tokens = new.num_computed_tokens
        self.sampling_params = new.sampling_params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class ModelRunner:
    def __init__(self, config: Config, rank: int = 0):
        self.config = config
        self.rank = rank
        hf = config.hf_config
        self.block_size = config.kvcache_block_size
        self.device = torch.device(config.device, rank) if config.device == "cuda" else torch.device("cpu")
        self.dtype = config.torch_dtype
        self.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
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
        fp8 = self.kv_cache_dtype == torch.float8_e4m3fn
        self.backend = get_backend(config.attention_backend, config.device, self.block_size, fp8)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in self.attention_layers:
            layer.backend = self.backend
            layer.calibrate_kv_scales = fp8 and config.calculate_kv_scales
        self.sampler = Sampler()
        self.eos_token_ids = sorted(config.eos_token_ids)  # min_tokens holds these back
        self.seqs: dict[int, SeqState] = {}

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
        return n * self.kv_cache_dtype.itemsize

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
        self.kv_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        gib = num_blocks * self.block_bytes / (1 << 30)
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB of %s",
            num_blocks,
            self.block_size,
            num_blocks * self.block_size,
            gib,
            str(self.kv_cache_dtype).removeprefix("torch."),
        )
        return num_blocks

    def _blocks_that_fit_on_gpu(self) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` of the card after a warm-up forward of a
        full step (``max_num_batched_tokens`` tokens) has shown the activations' peak."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.warmup_forward()
        torch.cuda.synchronize()
        peak = torch.cuda.memory_stats()["allocated_bytes.all.peak"]
        torch.cuda.empty_cache()  # the warm-up's freed blocks must not count as used
        free, total = torch.cuda.mem_get_info()
        used = total - free
        current = torch.cuda.memory_stats()["allocated_bytes.all.current"]
        budget = total * self.config.gpu_memory_utilization - used - peak + current
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
    def warmup_forward(self) -> None:
        """A forward without KV cache as large as a step can be: ``max_num_batched_tokens`` new
        tokens in prompts of at most ``max_model_len``, logits for up to ``max_num_seqs`` rows."""
        cfg = self.config
        num_tokens = cfg.max_num_batched_tokens
        lens = [cfg.max_model_len] * (num_tokens // cfg.max_model_len)
        if num_tokens % cfg.max_model_len:
            lens.append(num_tokens % cfg.max_model_len)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        context = Context(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=self.device),
            max_seqlen_q=max(lens),
            logits_indices=torch.arange(min(cfg.max_num_seqs, num_tokens), device=self.device),
        )
        with forward_context(context):
            input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
            self.model.compute_logits(self.model(input_ids, positions))

    # ---- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Forward every scheduled sequence's new tokens; sample one token for each sequence whose
        last known token was computed. Rank 0 returns the sampled tokens, other ranks None."""
        self._update_states(sched)
        input_ids, positions, context, sample_ids = self.prepare_inputs(sched)
        metadata = None
        if self.rank == 0 and sample_ids:  # built before the forward so its copies overlap it
            rows = [self.seqs[i] for i in sample_ids]
            metadata = SamplingMetadata.build(
                rows, self.config.hf_config.vocab_size, self.device, self.eos_token_ids
            )
        logits = self.run_model(input_ids, positions, context)
        if self.rank != 0:
            return None
        if not sample_ids:
            return ModelRunnerOutput([], [])
        out = self.sampler(logits, metadata)
        return ModelRunnerOutput(sample_ids, out.token_ids.tolist(), out.logprobs)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for seq_id in sched.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in sched.new_seqs:
            self.seqs[new.seq_id] = SeqState(new)
        c = sched.cached_seqs
        for seq_id, tokens, blocks, computed in zip(
            c.seq_ids, c.new_token_ids, c.new_block_ids, c.num_computed_tokens, strict=True
        ):
            state = self.seqs[seq_id]
            state.token_ids += tokens
            state.block_table += blocks
            state.num_computed_tokens = computed

    def prepare_inputs(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, Context, list[int]]:
        """Pack the step's new tokens; returns input ids, positions, the attention context and the
        ids of the sequences that sample (their last new token's row is in ``logits_indices``)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens_q, context_lens, logits_indices, sample_ids, tables = [0], [], [], [], []
        for seq_id, n in sched.num_scheduled_tokens.items():
            state = self.seqs[seq_id]
            start, end, table = state.num_computed_tokens, state.num_computed_tokens + n, state.block_table
            if n == 1:
                input_ids.append(state.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids += state.token_ids[start:end]
                positions += range(start, end)
                for i in range(start // bs, (end - 1) // bs + 1):
                    base = table[i] * bs - i * bs
                    slots += range(base + max(start, i * bs), base + min(end, (i + 1) * bs))
            cu_seqlens_q.append(cu_seqlens_q[-1] + n)
            context_lens.append(end)
            tables.append(table)
            if end == len(state.token_ids):
                logits_indices.append(cu_seqlens_q[-1] - 1)
                sample_ids.append(seq_id)
        max_seqlen_q = max(sched.num_scheduled_tokens.values())
        width = max(len(t) for t in tables)
        context = Context(
            cu_seqlens_q=self._to_device(cu_seqlens_q, torch.int32),
            max_seqlen_q=max_seqlen_q,
            context_lens=self._to_device(context_lens, torch.int32),
            # Decode steps bound the context by max_model_len, as the CUDA graphs do: same kernel split.
            max_context_len=self.config.max_model_len if max_seqlen_q == 1 else max(context_lens),
            block_tables=self._to_device([t + [0] * (width - len(t)) for t in tables], torch.int32),
            slot_mapping=self._to_device(slots, torch.int64),
            logits_indices=(
                None if len(logits_indices) == len(input_ids) else self._to_device(logits_indices, torch.int64)
            ),
        )
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), context, sample_ids

    def _to_device(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, context: Context) -> torch.Tensor:
        graphs = self.graphs
        with forward_context(context):
            if context.is_decode_only and graphs is not None and graphs.fits(input_ids.shape[0]):
                hidden = graphs.replay(input_ids, positions, context)
            else:
                hidden = self.model(input_ids, positions)
            return self.model.compute_logits(hidden)

    def shutdown(self) -> None:
        self.graphs = None
        self.seqs.clear()
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = None
        self.kv_cache = None
