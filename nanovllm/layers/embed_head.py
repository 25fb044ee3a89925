import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import all_reduce, gather_to_rank0, tp_rank, tp_size
from nanovllm.utils.context import get_context
from nanovllm.utils.loader import expect_shape


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across ranks; each rank looks up the ids it owns
    (others give zeros) and an all-reduce assembles the full embeddings."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        self.shard_size = (vocab_size + self.tp_size - 1) // self.tp_size
        self.vocab_start = self.tp_rank * self.shard_size
        # zeros only where the last shard has padding rows (a tied lm_head drops its own table unread)
        new = torch.zeros if self.shard_size * self.tp_size != vocab_size else torch.empty
        self.weight = nn.Parameter(new(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows_differ = loaded.dim() == 2 and loaded.shape[0] != self.vocab_size
        hint = f": the config's vocab_size={self.vocab_size} must equal its rows" if rows_differ else ""
        expect_shape(loaded, (self.vocab_size, param.shape[1]), hint)
        shard = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        param.data[: shard.shape[0]].copy_(shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mine.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits only at the rows that sample (``logits_indices``: the last new token of each sequence
    that samples this step); vocab shards gathered to rank 0 (other ranks return None)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        context = get_context()
        if context.logits_indices is not None:
            hidden_states = hidden_states[context.logits_indices]
        logits = self._linear(hidden_states)  # [num_seqs, shard_size]
        logits = gather_to_rank0(logits)
        return logits[:, : self.vocab_size] if logits is not None else None

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from nanovllm.kernels import gemv

            if gemv.gemv_eligible(x, self.weight):  # a decode step of a few rows (kernels/gemv.py)
                return gemv.gemv(x, self.weight)
        return F.linear(x, self.weight)
