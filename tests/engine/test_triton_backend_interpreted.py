"""The engine with the Triton backend on the CPU, its kernels under Triton's interpreter: it gives the
torch backend's greedy tokens, eagerly and through DecodeGraphs (engine/cuda_graphs.py: static buffers,
padded rows). A 40-token budget chunks the longer prompts beside the decodes (mixed steps).

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

    replays = []  # the batch size of every replay

    def replay(self):
        from nanovllm.utils import context

        graphs, bs = self.owner
        self.replays.append(bs)
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
    """``tokens(backend, kv_cache_dtype, graphs)``: greedy tokens of the three batches with the torch or
    the Triton backend. Each call first undoes the settings of the one before."""
    import nanovllm.engine.model_runner as model_runner
    from nanovllm.engine.cuda_graphs import DecodeGraphs
    from nanovllm.layers import attention_triton

    def run(backend: str, kv_cache_dtype: str = "auto", graphs: bool = True):
        monkeypatch.undo()
        SimulatedGraph.replays.clear()
        if backend == "triton":
            monkeypatch.setattr(model_runner, "get_backend", lambda *a, **kw: attention_triton.TritonBackend)
            monkeypatch.setattr(torch.cuda, "CUDAGraph", SimulatedGraph)
            monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
            monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        with LLM(tiny_ckpt("qwen3"), dtype="float32", kvcache_block_size=16, max_model_len=256,
                 max_num_batched_tokens=40, num_kvcache_blocks=64, max_num_seqs=16,
                 kv_cache_dtype=kv_cache_dtype) as llm:  # fmt: skip
            runner = llm.engine.executor
            if backend == "triton" and graphs:
                runner.graphs = DecodeGraphs(runner.model, runner.config, runner.device)
                for bs, graph in runner.graphs.graphs.items():
                    graph.owner = (runner.graphs, bs)
            out = [[o["token_ids"] for o in llm.generate(b, sp, use_tqdm=False)] for b in BATCHES]
        return out

    yield run
    monkeypatch.undo()


def test_triton_gives_the_torch_tokens_eager_and_in_graphs(tokens):
    expect = tokens("torch")
    assert tokens("triton", graphs=False) == expect
    assert not SimulatedGraph.replays
    assert tokens("triton") == expect
    assert {1, 4, 16} <= set(SimulatedGraph.replays), SimulatedGraph.replays  # padded rows in 4 and 16


def test_graphs_keep_the_eager_tokens_on_an_fp8_cache(tokens):
    eager = tokens("triton", "fp8", graphs=False)
    assert tokens("triton", "fp8") == eager
    assert SimulatedGraph.replays
