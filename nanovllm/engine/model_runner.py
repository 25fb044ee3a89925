"""Runs the model for one step: keeps each scheduled sequence's tokens and block table between
steps, builds the step's input tensors from the ``SchedulerOutput``, owns the KV cache, samples.

Every rank runs one; only rank 0 samples (the logits are gathered to it).
"""

import logging

import torch

from nanovllm.config import Config
from nanovllm.distributed import min_over_ranks
from nanovllm.engine.cuda_graphs import DecodeGraphs
from nanovllm.engine.input_batch import InputBatch
from nanovllm.engine.sequence import TokenCounts
from nanovllm.engine.step import ModelRunnerOutput, NewSeq, SchedulerOutput
from nanovllm.kernels.reference import key_major
from nanovllm.layers.attention import Attention, get_backend
from nanovllm.layers.kv_quant import kv_cache_torch_dtype
from nanovllm.layers.sampler import Sampler, SamplingMetadata, logprobs_to_lists
from nanovllm.models.llama import head_dim_of
from nanovllm.models.registry import model_class
from nanovllm.utils.context import Context, forward_context
from nanovllm.utils.loader import iter_safetensors, load_weights
from nanovllm.utils.memory import cpu_kv_cache_blocks, lazily_zeroed_cpu_tensor

logger = logging.getLogger("nanovllm")


class SeqState(TokenCounts):
    """What a runner keeps of one sequence between steps (the scheduler sends only changes).

    ``token_ids`` are the tokens the scheduler has sent; ``num_placeholders`` more were sampled
    here and are not back yet (async scheduling: their values are on the device). Penalties read
    ``completion_token_ids``: the engine waits for every step while such a request runs, so
    there are no placeholders then."""

    __slots__ = (
        "token_ids",
        "num_prompt_tokens",
        "block_table",
        "num_computed_tokens",
        "sampling_params",
        "num_placeholders",
    )

    def __init__(self, new: NewSeq):
        self.token_ids = list(new.token_ids)
        self.num_prompt_tokens = new.num_prompt_tokens
        self.block_table = list(new.block_ids)
        self.num_computed_tokens = new.num_computed_tokens
        self.sampling_params = new.sampling_params
        self.num_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_placeholders


class StepHandle:
    """A launched step (async scheduling): its sampled tokens are on their way to the host."""

    def __init__(self, seq_ids: list[int], tokens, event=None, logprobs=None, num_logprobs=None):
        self.seq_ids, self.tokens, self.event = seq_ids, tokens, event
        self.logprobs, self.num_logprobs = logprobs, num_logprobs

    def get(self) -> ModelRunnerOutput:
        """Wait for the step (the one host synchronisation per step) and return its tokens."""
        if not self.seq_ids:
            return ModelRunnerOutput([], [])
        if self.event is not None:
            self.event.synchronize()
        tokens = self.tokens[: len(self.seq_ids)].tolist()
        lp = None if self.logprobs is None else logprobs_to_lists(self.logprobs, self.num_logprobs)
        return ModelRunnerOutput(self.seq_ids, tokens, lp)


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
        self.inputs = InputBatch(
            config.max_num_batched_tokens,
            config.max_num_seqs,
            config.max_model_len,
            self.block_size,
            self.device,
        )
        self._metadata: tuple[list[int], SamplingMetadata] | None = None
        # The last step's sampled tokens on the device, and each sampling sequence's row in them.
        self._prev_sampled: torch.Tensor | None = None
        self._prev_rows: dict[int, int] = {}
        pin = self.device.type == "cuda"
        self._token_host = [
            torch.zeros(config.max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(3)
        ]
        self._turn = 0

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
        reads ``kv_cache[0, i]`` (K) and ``kv_cache[1, i]`` (V), V key-major in 64-slot blocks where
        the backend asks (``v_key_major``: the Triton kernels' fp8 cache; kernels/reference.py).
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
        # Zeros, not empty: the torch backend's masked attention multiplies unwritten slots by
        # zero weights, and garbage there can be NaN (measured: TP preemption on CPU read NaN).
        if self.device.type == "cpu":  # the OS zeroes pages as they are first touched: no start-up memset
            self.kv_cache = lazily_zeroed_cpu_tensor(shape, self.kv_cache_dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
        v_key_major = self.backend.v_key_major(self.kv_cache_dtype)
        for i, layer in enumerate(self.attention_layers):
            v_cache = self.kv_cache[1, i]
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], key_major(v_cache) if v_key_major else v_cache
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
        tokens in prompts of at most ``max_model_len``, logits for up to ``max_num_seqs`` rows.
        A one-token forward first: torch.compile's dynamic shapes (CUDA) still specialise a size
        of 1, and a lone token in an eager step recompiled the norms (~1 s) mid-run on an H200."""
        self._forward_no_cache(1)
        logits = self._forward_no_cache(self.config.max_num_batched_tokens)
        # Kernels that small steps compile on first use are built now, not inside the first requests
        # (measured on an H200: ~1 s of the reference workload went to compiling): the LM head's GEMV
        # variants for 1-4 rows (on every rank: the head gathers its vocabulary shards to rank 0) and
        # the sampling kernel's.
        if self.device.type == "cuda":
            weight = self.model.lm_head.weight
            hidden = torch.zeros(4, weight.shape[1], dtype=weight.dtype, device=self.device)
            with forward_context(Context()):
                for rows in range(1, 5):
                    self.model.compute_logits(hidden[:rows])
        if logits is not None and logits.is_cuda:
            from nanovllm.kernels.sample_race import race_sample

            temperatures = torch.ones(logits.shape[0], device=self.device)
            for rows in {1, logits.shape[0]}:
                for greedy in (None, temperatures[:rows] == 0):
                    race_sample(logits[:rows], temperatures[:rows], greedy)

    def _forward_no_cache(self, num_tokens: int) -> torch.Tensor | None:
        """``num_tokens`` new tokens in prompts of at most ``max_model_len``; their logits (up to
        ``max_num_seqs`` rows)."""
        cfg = self.config
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
            return self.model.compute_logits(self.model(input_ids, positions))

    # ---- one step ------------------------------------------------------------------------

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """Forward every scheduled sequence's new tokens; sample one token for each sequence whose
        last token was computed. Rank 0 returns the sampled tokens, other ranks None."""
        handle = self.execute_model_async(sched)
        return None if handle is None else handle.get()

    @torch.inference_mode()
    def execute_model_async(self, sched: SchedulerOutput) -> StepHandle | None:
        """Launch the step and return without waiting for it. Its sampled tokens stay on the
        device for the next step's placeholders; ``StepHandle.get()`` brings them to the host."""
        self._update_states(sched)
        input_ids, positions, context, sample_ids = self.prepare_inputs(sched)
        metadata = None
        if self.rank == 0 and sample_ids:  # built before the forward so its copies overlap it
            metadata = self._sampling_metadata(sample_ids)
        logits = self.run_model(input_ids, positions, context)
        if self.rank != 0:
            return None
        if not sample_ids:
            return StepHandle([], [])
        out = self.sampler(logits, metadata)
        self._prev_sampled, self._prev_rows = out.token_ids, {sid: i for i, sid in enumerate(sample_ids)}
        for seq_id in sample_ids:
            self.seqs[seq_id].num_placeholders += 1
        if self.device.type != "cuda":
            return StepHandle(sample_ids, out.token_ids, None, out.logprobs_packed, metadata.num_logprobs)
        host = self._token_host[self._turn]
        self._turn = (self._turn + 1) % len(self._token_host)
        host[: len(sample_ids)].copy_(out.token_ids, non_blocking=True)
        lp = None
        if out.logprobs_packed is not None:
            lp = torch.empty(out.logprobs_packed.shape, dtype=torch.float64, pin_memory=True)
            lp.copy_(out.logprobs_packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return StepHandle(sample_ids, host, event, lp, metadata.num_logprobs)

    def _sampling_metadata(self, sample_ids: list[int]) -> SamplingMetadata:
        """The step's sampling tensors; reused while the batch is the same and nothing in it
        depends on the step (seeds count tokens, min_tokens and penalties read them)."""
        cached = self._metadata
        if cached is not None and cached[0] == sample_ids:
            return cached[1]
        rows = [self.seqs[i] for i in sample_ids]
        metadata = SamplingMetadata.build(
            rows, self.config.hf_config.vocab_size, self.device, self.eos_token_ids
        )
        # (min_tokens only ever stops holding EOS back, so metadata without those rows stays right.)
        step_free = (
            metadata.seeded_rows is None and metadata.min_tokens_rows is None and metadata.no_penalties
        )
        self._metadata = (list(sample_ids), metadata) if step_free else None
        return metadata

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
            if tokens:  # the values of tokens sampled here earlier: they replace placeholders
                state.token_ids += tokens
                state.num_placeholders = max(0, state.num_placeholders - len(tokens))
            state.block_table += blocks
            state.num_computed_tokens = computed

    def prepare_inputs(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, Context, list[int]]:
        """The step's input ids (placeholders patched from the last step's samples), positions,
        attention context, and the ids of the sequences that sample, in logits-row order."""
        # Decode steps on a GPU bound the context by max_model_len, as the CUDA graphs do: same kernel split.
        pad = self.config.max_model_len if self.device.type == "cuda" else None
        input_ids, positions, context, sample_ids, fix = self.inputs.build(
            sched, self.seqs, self._prev_rows, pad
        )
        if fix is not None:
            input_ids[fix[0]] = self._prev_sampled[fix[1]]
        return input_ids, positions, context, sample_ids

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
