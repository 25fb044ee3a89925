"""DecodeGraphs (engine/cuda_graphs.py) on the CPU: its static buffers, padded rows and the flat decode
kernel's plan copies, with the Triton backend under Triton's interpreter. A CUDA graph is simulated:
capturing records nothing and a replay runs DecodeGraphs' forward again on its buffers, under the
context it was captured with, which is what a real replay computes. Real graphs:
tests/gpu/test_engine_gpu.py."""

import contextlib
import os

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU: tests/gpu/test_engine_gpu.py"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter"),
]

# Batches of 1, 3 and 10 rows replay the graphs of 1, 4 and 16: padded rows in the last two.
PROMPTS = [
    [3 + (7 * i + j) % 300 for j in range(n)] for i, n in enumerate((1, 9, 16, 17, 40, 70, 5, 33, 12, 3))
]


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


def tokens(path, monkeypatch, decode: str | None, kv_cache_dtype: str = "auto"):
    """Greedy tokens of the three batches; with ``decode`` set, the Triton backend and simulated
    graphs (NANOVLLM_DECODE=decode), else the torch backend, eager."""
    import nanovllm.engine.model_runner as model_runner
    from nanovllm.engine.cuda_graphs import DecodeGraphs
    from nanovllm.layers import attention_triton

    monkeypatch.undo()
    if decode is not None:
        monkeypatch.setattr(model_runner, "get_backend", lambda *a, **kw: attention_triton.TritonBackend)
        monkeypatch.setenv("NANOVLLM_DECODE", decode)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", SimulatedGraph)
        monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    attention_triton.flat_setting.cache_clear()
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    replayed = []
    with LLM(path, dtype="float32", kvcache_block_size=16, max_model_len=256, max_num_batched_tokens=40,
             num_kvcache_blocks=64, max_num_seqs=16, kv_cache_dtype=kv_cache_dtype) as llm:  # fmt: skip
        runner = llm.engine.executor
        if decode is not None:
            runner.graphs = DecodeGraphs(runner.model, runner.config, runner.device, runner.inputs.flat_plan)
            for bs, graph in runner.graphs.graphs.items():
                graph.owner = (runner.graphs, bs)
            replay = runner.graphs.replay
            runner.graphs.replay = lambda ids, *a: replayed.append(len(ids)) or replay(ids, *a)
        out = [
            [o["token_ids"] for o in llm.generate(b, sp, use_tqdm=False)]
            for b in (PROMPTS[:1], PROMPTS[1:4], PROMPTS)
        ]
    assert decode is None or {1, 3, 10} <= set(replayed), replayed
    return out


@pytest.fixture
def restore(monkeypatch):
    from nanovllm.layers import attention_triton

    yield
    monkeypatch.undo()
    attention_triton.flat_setting.cache_clear()


def test_graph_replays_give_the_eager_torch_tokens(tiny_ckpt, monkeypatch, restore):
    path = tiny_ckpt("qwen3")
    eager = tokens(path, monkeypatch, None)
    assert tokens(path, monkeypatch, "split") == eager
    assert tokens(path, monkeypatch, "flat") == eager


def test_graph_replays_of_the_flat_kernel_on_an_fp8_cache(tiny_ckpt, monkeypatch, restore):
    path = tiny_ckpt("qwen3")
    assert tokens(path, monkeypatch, "flat", "fp8") == tokens(path, monkeypatch, "split", "fp8")
