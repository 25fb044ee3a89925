"""The whole model with and without the decode GEMV (kernels/gemv.py): the same greedy tokens."""

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import gemv as gemv_mod

pytestmark = pytest.mark.gpu

# One and three sequences decode at batch 1 and 3 (the graph of 4): both take the GEMV; eight do not.
PROMPTS = [[3 + (5 * i + j) % 300 for j in range(n)] for i, n in enumerate((7, 30, 64, 1, 9, 16, 17, 40))]
SMALL = dict(kvcache_block_size=16, max_model_len=512, num_kvcache_blocks=256, max_num_seqs=16)


def greedy(path, max_rows, monkeypatch, eager):
    monkeypatch.setattr(gemv_mod, "GEMV_MAX_ROWS", max_rows)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(path, dtype="float32", enforce_eager=eager, **SMALL) as llm:
        return [[o["token_ids"] for o in llm.generate(batch, sp, use_tqdm=False)]
                for batch in (PROMPTS[:1], PROMPTS[1:4], PROMPTS)]  # fmt: skip


@pytest.mark.parametrize("eager", [True, False])
@pytest.mark.parametrize("arch", ["qwen3"])
def test_greedy_unchanged_by_gemv(tiny_ckpt, monkeypatch, arch, eager):
    calls = []
    real, real_norm = gemv_mod.gemv, gemv_mod.gemv_rms_norm
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(kw.get("act")) or real(*a, **kw))
    monkeypatch.setattr(
        gemv_mod, "gemv_rms_norm", lambda *a, **kw: calls.append("rms_norm") or real_norm(*a, **kw)
    )
    path = tiny_ckpt(arch)
    off = greedy(path, 0, monkeypatch, eager)
    assert not calls
    on = greedy(path, 4, monkeypatch, eager)
    assert "silu_mul" in calls, "batches of 1 and 3 should run the GEMV, the MLP's activation fused"
    assert "rms_norm" in calls, "... and the norms before the qkv and gate_up projections fused"
    # float32 on both sides: only the summation order differs, far below the tiny model's margins
    assert on == off
