import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler, SamplingMetadata, apply_penalties, seeded_exponentials
from nanovllm.layers.sampling_metadata import _token_occurrences
from nanovllm.sampling_params import SamplingParams

VOCAB = 32
NUM_SAMPLES = 20_000
DEVICE = "cpu"


def make_seq(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Sequence:
    seq = Sequence(list(prompt), params, block_size=16)
    for t in output:
        seq.append_token(t)
    return seq


def sample(logits: torch.Tensor, seqs: list[Sequence], eos=None):
    md = SamplingMetadata.build(seqs, logits.shape[1], DEVICE, eos_token_ids=eos)
    return Sampler()(logits.clone(), md)


def tv_bound(support: int, n: int, fail_prob: float = 1e-6) -> float:
    """Total-variation bound for an empirical distribution of ``n`` samples over ``support`` tokens.

    E[TV] = 1/2 sum_i E|p_i - p^_i| <= 1/2 sum_i sqrt(p_i / n) <= 1/2 sqrt(support / n)
    (Jensen, then Cauchy-Schwarz); one sample moves TV by at most 1/n, so by McDiarmid TV exceeds
    its mean by t with probability <= exp(-2 n t^2). (The tests are seeded, so not flaky anyway.)
    """
    return 0.5 * math.sqrt(support / n) + math.sqrt(math.log(1 / fail_prob) / (2 * n))


def hf_probs(logits: torch.Tensor, warpers) -> torch.Tensor:
    scores = LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())
    return torch.softmax(scores[0], dim=-1)


def empirical(token_ids: torch.Tensor) -> torch.Tensor:
    return torch.bincount(token_ids, minlength=VOCAB).double() / token_ids.numel()


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(VOCAB, generator=g) * 2.0  # [vocab]; peaked enough that every filter cuts


CASES = [
    (dict(temperature=0.5), lambda: [TemperatureLogitsWarper(0.5)]),
    (dict(temperature=1.7), lambda: [TemperatureLogitsWarper(1.7)]),
    (dict(top_k=5), lambda: [TopKLogitsWarper(5)]),
    (dict(top_p=0.7), lambda: [TopPLogitsWarper(0.7)]),
    (dict(min_p=0.1), lambda: [MinPLogitsWarper(0.1)]),
    (
        dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05),
        lambda: [
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(10),
            TopPLogitsWarper(0.9),
            MinPLogitsWarper(0.05),
        ],
    ),
]


@pytest.mark.parametrize("kwargs, warpers", CASES, ids=lambda c: str(c) if isinstance(c, dict) else "")
@pytest.mark.parametrize("seeded", [False, True], ids=["torch_rng", "seeded"])
def test_distribution_matches_hf(logits, kwargs, warpers, seeded):
    torch.manual_seed(1)
    # Seeded: every row has its own seed, so the rows test the hash RNG's quality across seeds.
    seqs = [make_seq(SamplingParams(seed=i if seeded else None, **kwargs)) for i in range(NUM_SAMPLES)]
    out = sample(logits.expand(NUM_SAMPLES, VOCAB), seqs)
    expected = hf_probs(logits, warpers()).double()
    got = empirical(out.token_ids)
    support = int((expected > 0).sum())
    assert got[expected == 0].sum() == 0, "sampled a token the HF processors remove"
    assert 0.5 * (got - expected).abs().sum() < tv_bound(support, NUM_SAMPLES)


def test_mixed_batch_each_row_follows_its_own_params(logits):
    torch.manual_seed(2)
    configs = [dict(temperature=0), dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(temperature=2.0)]
    per = 4000
    seqs = [make_seq(SamplingParams(**configs[i % len(configs)])) for i in range(per * len(configs))]
    tokens = sample(logits.expand(len(seqs), VOCAB), seqs).token_ids.view(per, len(configs))
    assert (tokens[:, 0] == logits.argmax()).all()
    hf = [
        [TopKLogitsWarper(3)],
        [TopPLogitsWarper(0.5)],
        [MinPLogitsWarper(0.3)],
        [TemperatureLogitsWarper(2.0)],
    ]
    for col, warpers in enumerate(hf, start=1):
        expected = hf_probs(logits, warpers).double()
        got = empirical(tokens[:, col])
        assert got[expected == 0].sum() == 0
        assert 0.5 * (got - expected).abs().sum() < tv_bound(int((expected > 0).sum()), per)


def test_top_k_1_equals_greedy():
    torch.manual_seed(3)
    logits = torch.randn(64, 1000)
    greedy = sample(logits, [make_seq(SamplingParams(temperature=0)) for _ in range(64)]).token_ids
    top1 = sample(logits, [make_seq(SamplingParams(top_k=1, temperature=1.3)) for _ in range(64)]).token_ids
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(top1, greedy)


def test_greedy_fast_path_flags():
    md = SamplingMetadata.build([make_seq(SamplingParams(temperature=0)) for _ in range(3)], VOCAB, DEVICE)
    assert md.all_greedy and md.no_penalties and md.no_top_k and md.no_top_p and md.no_min_p
    assert md.seeded_rows is None and md.max_num_logprobs is None and md.min_tokens_rows is None
    md = SamplingMetadata.build([make_seq(SamplingParams(temperature=0.7))], VOCAB, DEVICE)
    assert not md.all_greedy and md.no_top_k and md.no_top_p and md.no_min_p and md.no_penalties


def _generate(seed_row: int, companions: list[SamplingParams], params: SamplingParams, steps: int = 12):
    """Decode ``steps`` tokens for ``params`` at row ``seed_row`` of a batch of companions."""
    torch.manual_seed(seed_row + 100)  # the unseeded rows' noise differs between calls
    target = make_seq(params)
    others = [make_seq(p) for p in companions]
    # Logits depend only on the last token, like a tiny model; the same table in every call.
    table = torch.randn(50, 200, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        seqs = others[:seed_row] + [target] + others[seed_row:]
        logits = table[[s.last_token % 50 for s in seqs]]
        tokens = sample(logits, seqs).token_ids.tolist()
        for seq, t in zip(seqs, tokens, strict=True):
            seq.append_token(t)
    return target.completion_token_ids


def test_same_seed_same_tokens_whatever_the_batch():
    params = SamplingParams(seed=1234, temperature=1.0, top_p=0.95)
    alone = _generate(0, [], params)
    batched = _generate(
        3,
        [
            SamplingParams(),
            SamplingParams(seed=5),
            SamplingParams(temperature=0),
            SamplingParams(top_k=4, logprobs=2),
            SamplingParams(seed=1235),
        ],
        params,
    )
    assert alone == batched
    other_seed = _generate(0, [], SamplingParams(seed=4321, temperature=1.0, top_p=0.95))
    assert alone != other_seed


def test_seeded_noise_depends_on_seed_step_and_token_only():
    seeds = torch.tensor([[7, 0], [7, 0], [8, 0], [7, 1]])
    steps = torch.tensor([0, 1, 0, 0])
    e = seeded_exponentials(seeds, steps, 4096)
    assert torch.equal(e, seeded_exponentials(seeds, steps, 4096))
    assert torch.equal(e[:1], seeded_exponentials(seeds[:1], steps[:1], 4096))
    for i in range(1, 4):  # any change of seed (either half) or step changes the noise
        assert (e[0] != e[i]).float().mean() > 0.99
    assert (e > 0).all() and torch.isfinite(e).all()
    # Rows of neighbouring seeds / steps are uncorrelated: with 4096 pairs the sample correlation
    # of independent rows has sd ~ 1/64; 0.08 is five sd.
    for i in range(1, 4):
        assert abs(torch.corrcoef(torch.stack([e[0], e[i]]))[0, 1].item()) < 0.08
    # Neighbouring tokens within a row are uncorrelated too.
    assert abs(torch.corrcoef(torch.stack([e[0, :-1], e[0, 1:]]))[0, 1].item()) < 0.08
    assert abs(e.mean().item() - 1.0) < 0.05  # Exp(1): mean 1, sd 1, 16k samples


def test_seeded_noise_is_never_zero():
    """The noise of a seeded row came from 24 hash bits, and (b + 0.5) / 2**24 rounds to exactly 1.0
    in float32 for the top value (once in 16.8M: about 1% of steps of a 151,936-token vocabulary):
    -log(1) = -0.0, and p / -0.0 = -inf, so that token could not be drawn even at probability ~1.
    Seed 20170 at its first step hashes token 404 of a 1,000-token vocabulary to that value (found
    by searching the hash)."""
    e = seeded_exponentials(torch.tensor([[20170, 0]]), torch.tensor([0]), 1000)
    assert (e > 0).all()
    logits = torch.zeros(1, 1000)
    logits[0, 404] = 30.0  # probability ~1 - 1e-10
    seq = make_seq(SamplingParams(seed=20170, temperature=1.0))
    assert sample(logits, [seq]).token_ids.item() == 404


def test_min_tokens_suppresses_eos_and_stop_ids():
    logits = torch.zeros(4, VOCAB)
    logits[:, 5] = 10.0  # EOS
    logits[:, 7] = 9.0  # a stop token id
    logits[:, 9] = 8.0
    greedy_min = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7])
    seqs = [
        make_seq(greedy_min, output=(1,)),  # 1 < 3: suppress both
        make_seq(greedy_min, output=(1, 1, 1)),  # min_tokens reached: EOS allowed
        make_seq(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7], ignore_eos=True)),
        make_seq(SamplingParams(min_tokens=2, stop_token_ids=[7], temperature=0.01)),
    ]
    assert sample(logits, seqs, eos=5).token_ids.tolist() == [9, 5, 5, 9]
    assert sample(logits, seqs, eos=[3, 5]).token_ids.tolist() == [9, 5, 5, 9]


def test_repetition_penalty_matches_hf():
    torch.manual_seed(4)
    prompt, output = [3, 4, 4, 10], [10, 11, 3, 0]
    logits = torch.randn(2, VOCAB) * 3
    seqs = [make_seq(SamplingParams(repetition_penalty=p), prompt, output) for p in (1.5, 0.7)]
    md = SamplingMetadata.build(seqs, VOCAB, DEVICE)
    got = apply_penalties(logits.clone(), md)
    ids = torch.tensor([prompt + output])
    for row, p in enumerate((1.5, 0.7)):
        expected = RepetitionPenaltyLogitsProcessor(p)(ids, logits[row : row + 1].clone())[0]
        torch.testing.assert_close(got[row], expected, rtol=0, atol=0)
    # Greedy rows take the argmax after penalties (vLLM's order).
    greedy = [
        make_seq(SamplingParams(temperature=0, repetition_penalty=p), prompt, output) for p in (1.5, 0.7)
    ]
    assert torch.equal(sample(logits, greedy).token_ids, got.argmax(-1))


def test_presence_and_frequency_penalties_formula():
    torch.manual_seed(5)
    prompt, output = [1, 2, 2], [2, 6, 6, 6, 9]
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.3, repetition_penalty=1.2)
    md = SamplingMetadata.build([make_seq(params, prompt, output)], VOCAB, DEVICE)
    got = apply_penalties(logits.clone(), md)[0]
    expected = logits[0].clone()
    for t in set(prompt + output):  # repetition: prompt and output
        expected[t] = expected[t] / 1.2 if expected[t] > 0 else expected[t] * 1.2
    for t in set(output):  # presence / frequency: output only (OpenAI)
        expected[t] -= 0.5 + (-0.3) * output.count(t)
    torch.testing.assert_close(got, expected)


def test_token_occurrences():
    seqs = [make_seq(SamplingParams(), [1, 1, 4], [4, 4, 2]), make_seq(SamplingParams(), [0], [])]
    prompt_mask, counts = _token_occurrences(seqs, 6, DEVICE)
    assert prompt_mask.tolist() == [[0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert counts.tolist() == [[0, 0, 1, 0, 2, 0], [0, 0, 0, 0, 0, 0]]


def test_logprobs_are_raw_log_softmax_with_top_n_order():
    torch.manual_seed(6)
    logits = torch.randn(4, 100)
    seqs = [
        make_seq(SamplingParams(logprobs=5, temperature=0.3, top_k=3, repetition_penalty=1.5), output=(7,)),
        make_seq(SamplingParams()),  # did not ask
        make_seq(SamplingParams(logprobs=0, temperature=0)),
        make_seq(SamplingParams(logprobs=20, min_p=0.2, seed=1)),
    ]
    out = sample(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for row, n in [(0, 5), (2, 0), (3, 20)]:
        entry = out.logprobs[row]
        sampled = out.token_ids[row].item()
        order = raw[row].argsort(descending=True)[:n].tolist()
        assert list(entry)[:n] == order  # most likely first
        assert sampled in entry and len(entry) == n + (sampled not in order)
        for token, lp in entry.items():
            assert lp == pytest.approx(raw[row, token].item(), abs=1e-6)


def test_bf16_logits():
    logits = torch.randn(3, VOCAB).to(torch.bfloat16)
    seqs = [
        make_seq(SamplingParams(temperature=0)),
        make_seq(SamplingParams(top_p=0.9)),
        make_seq(SamplingParams()),
    ]
    out = sample(logits, seqs)
    assert out.token_ids.dtype == torch.int64 and out.token_ids[0] == logits[0].float().argmax()


def test_hash_matches_python_reference():
    from nanovllm.layers.sampler import _mix32

    def ref(x: int) -> int:
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF, 123456789]
    assert _mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [ref(x) for x in xs]


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=0), dict(temperature=0.7), dict(temperature=0.7, seed=3)]
)
def test_fast_paths_trace_as_one_graph(kwargs):
    """The engine wraps the sampler in torch.compile on CUDA: the greedy, temperature-only and
    seeded paths must have no graph break (traced here with the eager backend, no compiler)."""
    torch._dynamo.reset()
    compiled = torch.compile(Sampler(), backend="eager", fullgraph=True)
    seqs = [make_seq(SamplingParams(**kwargs)) for _ in range(4)]
    logits = torch.randn(4, VOCAB)
    out = compiled(logits.clone(), SamplingMetadata.build(seqs, VOCAB, DEVICE))
    if kwargs["temperature"] == 0:
        assert torch.equal(out.token_ids, logits.argmax(-1))
    else:
        assert ((out.token_ids >= 0) & (out.token_ids < VOCAB)).all()


@pytest.mark.parametrize("rows", [1, 4])
def test_few_rows_path_matches_hf_distribution(logits, rows):
    """Batches under FEW_ROWS take the softmax-free race: same distribution, sample by sample."""
    from nanovllm.layers.sampler import FEW_ROWS

    assert rows < FEW_ROWS
    torch.manual_seed(2)
    seqs = [make_seq(SamplingParams(temperature=0.5)) for _ in range(rows)]
    md = SamplingMetadata.build(seqs, VOCAB, DEVICE)
    calls = 8_000 // rows
    out = torch.cat([Sampler()(logits.expand(rows, VOCAB).clone(), md).token_ids for _ in range(calls)])
    expected = hf_probs(logits, [TemperatureLogitsWarper(0.5)]).double()
    got = empirical(out)
    assert 0.5 * (got - expected).abs().sum() < tv_bound(VOCAB, out.numel())
