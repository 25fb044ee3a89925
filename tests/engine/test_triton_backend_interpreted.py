"""The engine with the Triton backend on the CPU, its kernels under Triton's interpreter: the split and
the flat decode kernels (NANOVLLM_DECODE, layers/attention_triton.py) give the torch backend's greedy
tokens, eagerly and through DecodeGraphs (engine/cuda_graphs.py: static buffers, padded rows, the flat
plan's copies). A 40-token budget chunks the longer prompts beside the decodes (mixed steps).

A CUDA graph is simulated: capturing records nothing, and a replay runs DecodeGraphs' forward again on
its buffers under the context it was captured with, which is what a real replay computes. The same
engines on a GPU, with real graphs: tests/gpu/test_engine_gpu.py."""

import contextlib
import os

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    # The interpreter trips a numpy deprecation on every scalar branch of a kernel (as in tests/kernels).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU: tests/gpu/test_engine_gpu.py"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter"),
]

# Batches of 1, 3 and 10 rows: the graphs of 1, 4 and 16, padded rows in the last two.
PROMPTS = [
    [3 + (7 * i + j) % 300 for j in range(n)] for i, n in enumerate((1, 9, 16, 17, 40, 70, 5, 33, 12, 3))
]
BATCHES = (PROMPTS[:1], PROMPTS[1:4], PROMPTS)


class SimulatedGraph:
    owner = None  # (DecodeGraphs, batch size), set once they are built

    def replay(self):
        from nanovllm.utils import context

        graphs, bs = self.owner
        outer = context._CONTEXT  # the step's, set by the runner around the replay
        context._CONTEXT = graphs._context(bs)
        try:
            graphs._forward(bs)
        finally:
            context._CONTEXT = outer

    def pool(self):
        return None


@pytest.fixture
def tokens(tiny_ckpt, monkeypatch):
    """``tokens(decode, kv_cache_dtype, graphs)``: greedy tokens of the three batches with the Triton
    backend and NANOVLLM_DECODE=decode (None: the torch backend, eager), and the decode rows of each
    flat kernel call. Each call first undoes the settings of the one before."""
    import nanovllm.engine.model_runner as model_runner
    from nanovllm.engine.cuda_graphs import DecodeGraphs
    from nanovllm.layers import attention_triton

    def run(decode: str | None, kv_cache_dtype: str = "auto", graphs: bool = True):
        monkeypatch.undo()
        rows = []
        if decode is not None:
            monkeypatch.setattr(model_runner, "get_backend", lambda *a, **kw: attention_triton.TritonBackend)
            monkeypatch.setenv("NANOVLLM_DECODE", decode)
            monkeypatch.setattr(torch.cuda, "CUDAGraph", SimulatedGraph)
            monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
            monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
            flat = attention_triton.flat_decode_attention
            monkeypatch.setattr(attention_triton, "flat_decode_attention",
                                lambda q, *a, **kw: rows.append(len(q)) or flat(q, *a, **kw))  # fmt: skip
        attention_triton.flat_setting.cache_clear()
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        with LLM(tiny_ckpt("qwen3"), dtype="float32", kvcache_block_size=16, max_model_len=256,
                 max_num_batched_tokens=40, num_kvcache_blocks=64, max_num_seqs=16,
                 kv_cache_dtype=kv_cache_dtype) as llm:  # fmt: skip
            runner = llm.engine.executor
            assert (runner.inputs.flat_plan is not None) == (decode is not None and decode != "split")
            if decode is not None and graphs:
                runner.graphs = DecodeGraphs(
                    runner.model, runner.config, runner.device, runner.inputs.flat_plan
                )
                for bs, graph in runner.graphs.graphs.items():
                    graph.owner = (runner.graphs, bs)
            out = [[o["token_ids"] for o in llm.generate(b, sp, use_tqdm=False)] for b in BATCHES]
        return out, rows

    yield run
    monkeypatch.undo()
    attention_triton.flat_setting.cache_clear()


def test_split_and_flat_give_the_torch_tokens_eager_and_in_graphs(tokens):
    expect, _ = tokens(None)
    assert tokens("split")[0] == expect
    out, rows = tokens("flat")
    assert out == expect
    # the flat kernel served the graphs (at their padded sizes) and the decodes of mixed steps (other
    # counts); eagerly, the decode steps at their own sizes
    assert {1, 4, 16} <= set(rows) and set(rows) - {1, 4, 16}, rows
    out, rows = tokens("flat", graphs=False)
    assert out == expect
    assert {1, 3, 10} <= set(rows), rows


def test_split_and_flat_agree_on_an_fp8_cache(tokens):
    assert tokens("flat", "fp8")[0] == tokens("split", "fp8")[0]
