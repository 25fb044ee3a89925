"""What vLLM-style sampling options cost a request that uses none of them (CPU, host + device).

Times one sampling step for a batch of plain temperature requests: the engine's first sampler
(temperature + exponential race, commit 0928d32, reproduced inline below as the baseline) against
the current ``SamplingMetadata.build`` + ``Sampler``. Prints one JSON line.
"""

import json
import time

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler, SamplingMetadata
from nanovllm.sampling_params import SamplingParams


def first_sampler(logits: torch.Tensor, seqs) -> torch.Tensor:
    temps = torch.tensor([s.sampling_params.temperature for s in seqs], dtype=torch.float32)
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temps.clamp(min=1e-5).unsqueeze(1), dim=-1)
    sampled = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)
    return torch.where(temps == 0, greedy, sampled)


def timed(fn, repeats: int = 30) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - start) / repeats


def main(batch: int = 64, vocab: int = 49152) -> None:
    torch.manual_seed(0)
    seqs = [Sequence(list(range(100)), SamplingParams(temperature=0.6), 16) for _ in range(batch)]
    logits = torch.randn(batch, vocab)
    sampler = Sampler()
    before = timed(lambda: first_sampler(logits.clone(), seqs))
    after = timed(lambda: sampler(logits.clone(), SamplingMetadata.build(seqs, vocab, "cpu", [2])))
    print(
        json.dumps(
            {
                "bench": "sampler_overhead",
                "device": "cpu",
                "batch": batch,
                "vocab": vocab,
                "first_sampler_ms": round(before, 2),
                "current_sampler_ms": round(after, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
