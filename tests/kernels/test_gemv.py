"""The Triton GEMV (kernels/gemv.py) against plain torch in float64: small shapes under the CPU
interpreter, the Qwen3-0.6B shapes in bf16 on a GPU, and the linear layers that route to it."""

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.paged_kv import device

pytest.importorskip("triton")

from nanovllm.kernels import gemv as gemv_mod  # noqa: E402
from nanovllm.kernels.gemv import GemvConfig, default_config, gemv, gemv_rms_norm  # noqa: E402

# The output is rounded once from a float32 sum. float32: only the summation order differs;
# float16/bf16: half an ulp of the output (2^-11 / 2^-8 relative), plus the float32 sum's own error.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


def make(m, n, k, dtype, dev, seed=0, x_cols=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, x_cols or k, generator=gen).to(dtype).to(dev)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(dev)
    bias = torch.randn(n, generator=gen).to(dtype).to(dev)
    return x, w, bias


def reference(x, w, bias=None, act=None):
    """float64 product of the (rounded) inputs; with silu_mul the activation is rounded once to
    x's dtype first, as the compiled silu_and_mul does."""
    if act == "silu_mul":
        gate, up = x.double().chunk(2, dim=-1)
        x = (F.silu(gate) * up).to(x.dtype)
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def check(got, want, dtype):
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


# (N, K, config): masks on N and K (20 rows in blocks of 8, K=100 in tiles of 32), whole tiles,
# split K with a short last slice (100 = 48 + 48 + 4), and one tile wider than K.
CASES = [
    (20, 100, GemvConfig(8, 32)),
    (64, 128, GemvConfig(16, 64)),
    (20, 100, GemvConfig(4, 16, split_k=3)),
    (20, 100, GemvConfig(2, 128)),  # one tile wider than K (as down_proj's 4096 for 3072)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k,config", CASES)
def test_gemv_matches_torch(dtype, m, n, k, config):
    x, w, bias = make(m, n, k, dtype, device(), seed=n + k + m)
    check(gemv(x, w, config=config), reference(x, w), dtype)


@pytest.mark.parametrize("m", [2, 6])  # 6: two launches of at most 4 rows
@pytest.mark.parametrize("config", [GemvConfig(8, 32), GemvConfig(8, 32, split_k=2)])
def test_gemv_bias_and_out(config, m):
    """The bias is added in float32 before the one rounding; ``out=`` may be a strided view."""
    dtype, n, k = torch.float16, 24, 96
    x, w, bias = make(m, n, k, dtype, device(), seed=3)
    buf = torch.full((m, n + 8), 7.0, dtype=dtype, device=device())
    out = buf[:, 4 : 4 + n]
    y = gemv(x, w, out=out, bias=bias, config=config)
    assert y.data_ptr() == out.data_ptr()
    check(out, reference(x, w, bias), dtype)
    assert (buf[:, :4] == 7).all() and (buf[:, 4 + n :] == 7).all()  # nothing outside the view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [GemvConfig(8, 32), GemvConfig(8, 16, split_k=2)])
def test_gemv_silu_mul(dtype, config):
    m, n, k = 3, 20, 48
    x, w, _ = make(m, n, k, dtype, device(), seed=5, x_cols=2 * k)
    check(gemv(x, w, act="silu_mul", config=config), reference(x, w, act="silu_mul"), dtype)


def normed_reference(x, residual, norm_w, eps):
    """(RMSNorm(x + residual) rounded where the model's add_rms_norm rounds, x + residual), in plain
    torch: the sum and the normalised value to x's dtype, then the product with the weight."""
    h = x if residual is None else x + residual
    y = h.double() * torch.rsqrt(h.double().pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * norm_w, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (1, 20, 96, GemvConfig(8, 128)),  # one tile wider than K
        (3, 24, 96, GemvConfig(8, 32)),  # a narrower tile asked for: widened to hold the row
        (6, 20, 100, GemvConfig(4, 16, split_k=3)),  # split K asked for: one split; two launches
    ],
)
def test_gemv_rms_norm_matches_torch(dtype, with_residual, m, n, k, config):
    x, w, bias = make(m, n, k, dtype, device(), seed=m + n)
    gen = torch.Generator().manual_seed(k)
    residual = (torch.randn(m, k, generator=gen) * 3).to(dtype).to(device()) if with_residual else None
    norm_w = (1 + torch.randn(k, generator=gen) / 4).to(dtype).to(device())
    eps = 1e-6
    normed, h = normed_reference(x, residual, norm_w, eps)
    y, res = gemv_rms_norm(x, residual, norm_w, eps, w, bias=bias, config=config)
    check(y, reference(normed, w, bias), dtype)
    torch.testing.assert_close(res, h, atol=0, rtol=0)  # the new residual is exactly the rounded sum
    if residual is None:
        assert res is x
    else:
        assert res.data_ptr() not in (x.data_ptr(), residual.data_ptr())


def test_gemv_rms_norm_rejects_bad_inputs():
    x, w, _ = make(2, 8, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="norm weight must be"):
        gemv_rms_norm(x, None, torch.ones(16), 1e-6, w)
    with pytest.raises(ValueError, match="norm weight must be"):
        gemv_rms_norm(x, None, torch.ones(32, dtype=torch.float16), 1e-6, w)
    with pytest.raises(ValueError, match="residual must be"):
        gemv_rms_norm(x, torch.ones(1, 32), torch.ones(32), 1e-6, w)


def test_gemv_rejects_bad_inputs():
    x, w, _ = make(1, 8, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="columns"):
        gemv(x, w, act="silu_mul")
    with pytest.raises(ValueError, match="float16"):
        gemv(x.half(), w)
    with pytest.raises(ValueError, match="unknown act"):
        gemv(x, w, act="gelu")
    with pytest.raises(ValueError, match="out must be"):
        gemv(x, w, out=torch.empty(1, 9))


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (151936, 1024), (1000, 1000), (3, 5000)])
def test_default_config_covers_the_shape(n, k):
    cfg = default_config(n, k)
    assert cfg.block_n & (cfg.block_n - 1) == 0 and cfg.block_k & (cfg.block_k - 1) == 0
    if k % 64 == 0:
        assert k % cfg.block_k == 0  # no masked tail tile
    assert n // cfg.block_n >= min(n, gemv_mod.TARGET_PROGRAMS) // 2 or cfg.block_n == 1


def test_env_switches(monkeypatch):
    monkeypatch.setenv("NANOVLLM_GEMV_MAX_ROWS", "8")
    assert gemv_mod._max_rows_from_env() == 8
    monkeypatch.setenv("NANOVLLM_GEMV", "0")
    assert gemv_mod._max_rows_from_env() == 0
    monkeypatch.delenv("NANOVLLM_GEMV")
    monkeypatch.setenv("NANOVLLM_GEMV_MAX_ROWS", "four")
    with pytest.raises(ValueError, match="NANOVLLM_GEMV_MAX_ROWS"):
        gemv_mod._max_rows_from_env()


def test_cpu_linear_keeps_f_linear():
    from nanovllm.layers.linear import ReplicatedLinear

    layer = ReplicatedLinear(32, 8)
    layer.weight.data.normal_()
    x = torch.randn(1, 32)
    assert not layer.takes_gemv(x)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), atol=0, rtol=0)
    with pytest.raises(ValueError, match="takes_gemv"):
        layer.linear(x, None, act="silu_mul")


# --- GPU: the Qwen3-0.6B shapes in bf16 ----------------------------------------------------------
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemv_real_shapes_bf16(m, shape):
    n, k = SHAPES[shape]
    x, w, bias = make(m, n, k, torch.bfloat16, "cuda", seed=m)
    check(gemv(x, w), reference(x, w), torch.bfloat16)
    check(gemv(x, w, bias=bias, config=GemvConfig(8, 256, split_k=4)), reference(x, w, bias), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_gemv_lm_head_and_silu_mul_bf16(m):
    x, w, _ = make(m, 151936, 1024, torch.bfloat16, "cuda", seed=m)
    check(gemv(x, w), reference(x, w), torch.bfloat16)
    x, w, _ = make(m, 1024, 3072, torch.bfloat16, "cuda", seed=m, x_cols=6144)
    check(gemv(x, w, act="silu_mul"), reference(x, w, act="silu_mul"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("shape", ["qkv", "gate_up"])
def test_gemv_rms_norm_real_shapes_bf16(m, shape):
    n, k = SHAPES[shape]
    x, w, _ = make(m, n, k, torch.bfloat16, "cuda", seed=m)
    residual = torch.randn(m, k, device="cuda").to(torch.bfloat16) * 4
    norm_w = (1 + torch.randn(k, device="cuda") / 4).to(torch.bfloat16)
    normed, h = normed_reference(x, residual, norm_w, 1e-6)
    y, res = gemv_rms_norm(x, residual, norm_w, 1e-6, w)
    check(y, reference(normed, w), torch.bfloat16)
    torch.testing.assert_close(res, h, atol=0, rtol=0)


@pytest.mark.gpu
def test_linear_layers_take_the_gemv(monkeypatch):
    from nanovllm.layers.linear import ColumnParallelLinear

    layer = ColumnParallelLinear(1024, 4096, bias=True).to("cuda", torch.bfloat16)
    layer.weight.data.normal_(std=0.03)
    layer.bias.data.normal_()
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check(layer(x), reference(x, layer.weight, layer.bias), torch.bfloat16)
    assert calls, "2 rows on CUDA should take the GEMV"
    layer(torch.randn(gemv_mod.GEMV_MAX_ROWS + 1, 1024, device="cuda", dtype=torch.bfloat16))
    assert len(calls) == 1, "more rows than GEMV_MAX_ROWS go to cuBLAS"
    assert gemv_mod.GEMV_CONFIGS[(4096, 1024, 4)] is None  # the tuned table leaves 4 rows to cuBLAS
    layer(torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16))
    assert len(calls) == 1, "a shape the table gives to cuBLAS does not take the GEMV"


@pytest.mark.parametrize("m", [1, 5])  # 5 rows: more than GEMV_MAX_ROWS, the unfused path
def test_mlp_routes_silu_mul_into_the_down_projection(monkeypatch, m):
    """The model's MLP on the GEMV path (forced here on the CPU) against its plain torch path."""
    from types import SimpleNamespace

    from nanovllm.layers.linear import LinearBase
    from nanovllm.models.llama import LlamaMLP

    mlp = LlamaMLP(SimpleNamespace(hidden_size=32, intermediate_size=48)).to(device())
    for p in mlp.parameters():
        p.data.normal_(std=0.2)
    x = torch.randn(m, 32, device=device())
    gate, up = F.linear(x, mlp.gate_up_proj.weight).chunk(2, dim=-1)  # [gate | up]
    want = F.linear(F.silu(gate) * up, mlp.down_proj.weight)
    acts = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **kw: acts.append(kw.get("act")) or real(*a, **kw))
    monkeypatch.setattr(LinearBase, "takes_gemv", lambda self, x: x.shape[0] <= 4)
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    assert acts == ([None, "silu_mul"] if m <= 4 else [])


@pytest.mark.parametrize("first_layer", [True, False])
def test_norm_forward_fuses_the_norm_into_the_gemv(monkeypatch, first_layer):
    """A column-parallel layer's norm_forward on the GEMV path (forced here on the CPU) against the
    RMSNorm module followed by the layer; the first layer has no residual yet."""
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.linear import ColumnParallelLinear, LinearBase

    layer, norm = ColumnParallelLinear(32, 24, bias=True).to(device()), RMSNorm(32).to(device())
    for p in (*layer.parameters(), norm.weight):
        p.data.normal_(std=0.5)
    x = torch.randn(2, 32, device=device())
    residual = None if first_layer else torch.randn(2, 32, device=device())
    h, want_residual = (norm(x), x) if first_layer else norm(x, residual)
    want = layer(h)
    fused = []
    real = gemv_mod.gemv_rms_norm
    monkeypatch.setattr(gemv_mod, "gemv_rms_norm", lambda *a, **kw: fused.append(1) or real(*a, **kw))
    monkeypatch.setattr(LinearBase, "takes_gemv", lambda self, x: True)
    y, new_residual = layer.norm_forward(norm, x, residual)
    assert fused == [1]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_residual, want_residual, atol=0, rtol=0)
