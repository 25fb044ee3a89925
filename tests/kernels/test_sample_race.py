"""The one-pass sampling kernel (kernels/sample_race.py) against plain torch: argmax for greedy rows,
softmax(l / T) frequencies for sampled rows, masked tokens never drawn."""

import pytest
import torch

from tests.kernels.paged_kv import device

pytest.importorskip("triton")

from nanovllm.kernels.sample_race import chunk_size, race_sample, race_sample_ref  # noqa: E402


def test_greedy_rows_match_torch_argmax_across_chunks_and_ties():
    rows, vocab = 3, 2 * chunk_size(3) + 452  # three chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=gen)
    logits[0, 5] = logits[0, vocab - 3] = 9.0  # a tie across chunks: the lower id wins
    logits[1, vocab - 1] = 9.0  # the very last id, in the partial chunk
    logits[2, chunk_size(3) + 7] = logits[2, chunk_size(3) + 9] = 9.0  # a tie inside a chunk
    logits = logits.to(torch.float16).to(device())
    zeros = torch.zeros(rows, device=device())
    got = race_sample(logits, zeros, seed=1).cpu()
    assert got.tolist() == [5, vocab - 1, chunk_size(3) + 7]
    assert torch.equal(got, logits.float().argmax(dim=1).cpu())


def test_greedy_mask_rows_take_the_argmax_and_sampled_rows_vary():
    rows, vocab = 4, 300
    logits = torch.zeros(rows, vocab)
    logits[:, 17] = 0.5  # the argmax, but far from certain when sampled at temperature 1
    logits = logits.to(device())
    temperatures = torch.ones(rows, device=device())
    mask = torch.tensor([True, False, True, False], device=device())
    draws = torch.stack([race_sample(logits, temperatures, mask, seed=s).cpu() for s in range(6)])
    assert (draws[:, [0, 2]] == 17).all()
    assert len(set(draws[:, [1, 3]].flatten().tolist())) > 2


def test_masked_tokens_are_never_drawn():
    rows, vocab = 8, 700
    logits = torch.full((rows, vocab), -float("inf"))
    allowed = torch.tensor([3, 350, 699])
    logits[:, allowed] = torch.tensor([1.0, 0.0, -1.0])
    logits = logits.to(device())
    temperatures = torch.full((rows,), 2.0, device=device())
    for s in range(4):
        got = race_sample(logits, temperatures, seed=s).cpu()
        assert torch.isin(got, allowed).all()


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(5, 1000, device=device())
    temperatures = torch.ones(5, device=device())
    a, b = (race_sample(logits, temperatures, seed=7).cpu() for _ in range(2))
    c = race_sample(logits, temperatures, seed=8).cpu()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(("temperature", "rows", "seeds"), [(0.5, 32, 20), (1.0, 8, 80)])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature, rows, seeds):
    # 640 draws each; 32 rows take the many-rows chunk size, 8 rows the few-rows one.
    vocab = 4
    row = torch.tensor([0.0, 1.0, 2.0, 3.0])
    logits = row.expand(rows, vocab).contiguous().to(torch.bfloat16).to(device())
    temperatures = torch.full((rows,), temperature, device=device())
    draws = torch.cat([race_sample(logits, temperatures, seed=s).cpu() for s in range(seeds)])
    freq = torch.bincount(draws, minlength=vocab).float() / draws.numel()
    expected = torch.softmax(row / temperature, dim=0)
    # 4.5 standard errors (0.09); T = 0.5 and T = 1 differ by 0.22 in the top token's probability.
    assert (freq - expected).abs().max() < 4.5 * (0.25 / draws.numel()) ** 0.5


def test_reference_has_the_same_distribution():
    gen = torch.Generator().manual_seed(3)
    row = torch.tensor([0.0, 1.0, 2.0, 3.0])
    n = 4000
    uniform = torch.rand(n, 4, generator=gen)
    draws = race_sample_ref(row.expand(n, 4), torch.full((n,), 0.5), uniform)
    freq = torch.bincount(draws, minlength=4).float() / n
    assert (freq - torch.softmax(row / 0.5, dim=0)).abs().max() < 0.04
    greedy = race_sample_ref(row.expand(2, 4), torch.zeros(2), uniform[:2])
    assert greedy.tolist() == [3, 3]


def test_no_noise_is_infinite_so_no_draw_is_certain():
    """The uniforms came from 24 hash bits, and (b + 0.5) / 2**24 rounds to exactly 1.0 in float32 for
    the top value b = 2**24 - 1 (once in 16.8M logits: about twice a step at 256 rows of 151,936),
    whose noise -log(-log 1) is +inf: that token won whatever its logit. With seed 2175, token 282 of
    a one-row call hashes to that value (found by inverting the hash); the kernel now takes 23 bits."""
    logits = torch.zeros(1, 1000)
    logits[0, 282] = -1e4  # never the draw of a sane sampler
    got = race_sample(logits.to(device()), torch.ones(1, device=device()), seed=2175)
    assert got.item() != 282
