"""Decode steps replayed from CUDA graphs: one graph per padded batch size.

A decode step launches hundreds of small kernels; replaying them as one graph removes the CPU's
launch cost, which dominates at small batches.
"""

import math

import torch

from nanovllm.config import Config
from nanovllm.utils.buckets import graph_batch_sizes, orders_decode
from nanovllm.utils.context import Context, forward_context


class DecodeGraphs:
    """The captured decode graphs of one model and the input buffers they read.

    A batch runs in the smallest graph that holds it. The rows past the batch get slot -1 (no K/V
    write) and a context length of 1; their outputs are ignored. Every graph shares one memory
    pool and one set of input buffers, so all of them together cost little more than the largest.
    The attention kernel is given ``max_model_len`` as its context bound, never the batch's real
    lengths, so nothing captured depends on them (and eager decode uses the same bound, so both do
    identical arithmetic).
    """

    @torch.inference_mode()
    def __init__(self, model, config: Config, device: torch.device):
        self.model = model
        self.max_model_len = config.max_model_len
        self.batch_sizes = graph_batch_sizes(config.max_num_seqs)
        max_bs = self.batch_sizes[-1]
        max_blocks = math.ceil(config.max_model_len / config.kvcache_block_size)
        hidden_size, dtype = config.hf_config.hidden_size, config.torch_dtype
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        # Context.decode_order of the graphs from the 16-row bucket on. A padded row keeps its own
        # place, after the batch's, with its length of 1: ``padding`` holds those columns.
        self.padding = torch.stack([torch.arange(max_bs), torch.ones(max_bs, dtype=torch.int64)])
        self.padding = self.padding.to(device=device, dtype=torch.int32)
        self.decode_order = self.padding.clone()
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for bs in reversed(self.batch_sizes):  # the largest first, so its pool fits all the others
            graph = torch.cuda.CUDAGraph()
            with forward_context(self._context(bs)):
                self._forward(bs)  # warm-up outside the capture (compilation, autotuning)
                with torch.cuda.graph(graph, pool):
                    self._forward(bs)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()

    def _context(self, bs: int) -> Context:
        return Context(
            context_lens=self.context_lens[:bs],
            max_context_len=self.max_model_len,
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            decode_order=self.decode_order[:, :bs] if orders_decode(bs) else None,
        )

    def _forward(self, bs: int) -> None:
        self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])

    def fits(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, context: Context) -> torch.Tensor:
        """The last hidden states of a decode batch of ``len(input_ids)`` rows."""
        batch = input_ids.shape[0]
        bs = next(b for b in self.batch_sizes if b >= batch)
        self.input_ids[:batch] = input_ids
        self.positions[:batch] = positions
        self.slot_mapping.fill_(-1)
        self.slot_mapping[:batch] = context.slot_mapping
        self.context_lens.fill_(1)
        self.context_lens[:batch] = context.context_lens
        if orders_decode(bs):  # then orders_decode(batch) too: the same bucket
            self.decode_order[:, :batch] = context.decode_order
            if batch < bs:
                self.decode_order[:, batch:bs] = self.padding[:, batch:bs]
        self.block_tables[:batch, : context.block_tables.shape[1]] = context.block_tables
        self.graphs[bs].replay()
        return self.hidden[:batch]
