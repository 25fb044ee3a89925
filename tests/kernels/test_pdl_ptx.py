"""The PDL contract (kernels/pdl.py) read off the PTX, on any machine: each kernel compiled for sm_90
with PDL on, in a subprocess (this one runs Triton's interpreter), then its instructions before
``griddepcontrol.wait`` are checked: no store, and no load whose address derives from a pointer
another kernel writes (followed through every instruction from the parameter on). The GEMV must
still load its weights there: that is what PDL buys it. The GPU test that PDL on and off give
identical logprobs is tests/gpu/test_engine_gpu.py::test_pdl_on_and_off_identical."""

import json
import os
import re
import subprocess
import sys

import pytest

COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nanovllm.kernels import decode_attention, gemv, qkv_prep

def ptx(fn, pointers, floats, consts, div16=(), num_warps=4):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = pointers.get(name) or ("fp32" if name in floats else "i32")
        if name in pointers or name in div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    consts = {(fn.arg_names.index(k),): v for k, v in (consts | {"PDL": True}).items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": num_warps, "launch_pdl": True}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

bf16 = "*bf16"
fp8 = "*fp8e4nv"
g = dict(x_ptr=bf16, w_ptr=bf16, bias_ptr=bf16, out_ptr=bf16, res_ptr=bf16, res_out_ptr=bf16, norm_w_ptr=bf16)
gk = dict(EVEN_K=True, SPLIT=False, SILU_MUL=False, HAS_BIAS=False, NORM=False, HAS_RES=False, BLOCK_M=1)
dec = dict(q_ptr=bf16, k_cache_ptr=bf16, v_cache_ptr=bf16, block_tables_ptr="*i32", context_lens_ptr="*i32",
           order_ptr="*i32", out_ptr=bf16, partial_ptr="*fp32", lse_ptr="*fp32", counters_ptr="*i32",
           k_scale_ptr="*fp32", v_scale_ptr="*fp32")
dk = dict(GROUP=2, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=256, BLOCK_N=64, DOT_PRECISION="tf32", FP8=False,
          FP16_DOT=False, V_STAGED=False, MERGE_G=2, MERGE_CHUNK=16, SPLITS_PAD=64, ORDERED=True,
          V_KEY_MAJOR=False, V_BLOCK=256, ONE_LOOP=False, MASKED_STAGES=1, WARP_SPLIT=1)
dec_div16 = ("stride_qb", "stride_qh", "stride_cb", "stride_cs", "stride_ch")
out = {
    "gemv_rms_norm": ptx(gemv._gemv_kernel, g, {"eps"},
                         gk | dict(BLOCK_N=4, BLOCK_K=1024, NORM=True, HAS_RES=True)),
    "gemv": ptx(gemv._gemv_kernel, g, {"eps"}, gk | dict(BLOCK_N=2, BLOCK_K=2048)),
    "gemv_silu_mul": ptx(gemv._gemv_kernel, g, {"eps"},
                         gk | dict(BLOCK_N=2, BLOCK_K=4096, EVEN_K=False, SILU_MUL=True, BLOCK_M=2)),
    "split_k_reduce": ptx(gemv._split_k_reduce_kernel, dict(partial_ptr="*fp32", bias_ptr=bf16, out_ptr=bf16),
                          set(), dict(SPLIT_K=2, BLOCK=1024, HAS_BIAS=False)),
    "qkv_prep": ptx(qkv_prep._qkv_prep_kernel,
                    dict(qkv_ptr=bf16, positions_ptr="*i64", cos_sin_ptr="*fp32", q_weight_ptr=bf16,
                         k_weight_ptr=bf16, q_out_ptr=bf16, k_cache_ptr=bf16, v_cache_ptr=bf16,
                         slot_mapping_ptr="*i64", k_scale_ptr="*fp32", v_scale_ptr="*fp32"),
                    {"eps"}, dict(NUM_HEADS=16, NUM_KV_HEADS=8, HEAD_DIM=128, ROWS=32, KV_ROWS=8,
                                  BLOCK_SIZE=256, V_BLOCK=256,
                                  QK_NORM=True, FP8=False)),
    "decode_split": ptx(decode_attention._decode_split_kernel, dec, {"qk_scale", "v_unit"},
                        dk | dict(ONE_SPLIT=True), div16=dec_div16),
    "decode_split_merge": ptx(decode_attention._decode_split_kernel, dec, {"qk_scale", "v_unit"},
                              dk | dict(ONE_SPLIT=False), div16=dec_div16),
    "decode_split_fp8": ptx(decode_attention._decode_split_kernel,
                            dec | dict(k_cache_ptr=fp8, v_cache_ptr=fp8), {"qk_scale", "v_unit"},
                            dk | dict(ONE_SPLIT=False, FP8=True, FP16_DOT=True, BLOCK_N=128,
                                      V_KEY_MAJOR=True, V_BLOCK=64, ONE_LOOP=True,
                                      MASKED_STAGES=3),  # as the engine's fp8 cache
                            div16=dec_div16),
    "decode_split_fp8_warps": ptx(decode_attention._decode_split_kernel,
                                  dec | dict(k_cache_ptr=fp8, v_cache_ptr=fp8), {"qk_scale", "v_unit"},
                                  dk | dict(ONE_SPLIT=False, FP8=True, FP16_DOT=True, BLOCK_N=128,
                                            V_KEY_MAJOR=True, V_BLOCK=64, ONE_LOOP=True, MASKED_STAGES=3,
                                            WARP_SPLIT=4),  # the warp_split launch option
                                  div16=dec_div16),
}
json.dump(out, sys.stdout)
"""

# Parameters another kernel writes (or that this one writes): nothing may be read through them before
# the wait. Every other pointer is a weight (or the cos/sin table), fixed for the engine's life.
DEPENDENT = {
    "gemv_rms_norm": ("_gemv_kernel", {0, 3, 4, 5}),  # x, out, residual, residual out
    "gemv": ("_gemv_kernel", {0, 3, 4, 5}),
    "gemv_silu_mul": ("_gemv_kernel", {0, 3, 4, 5}),
    "split_k_reduce": ("_split_k_reduce_kernel", {0, 2}),
    "qkv_prep": ("_qkv_prep_kernel", {0, 1, 5, 6, 7, 8}),  # qkv, positions, q out, caches, slots
    # q, caches, block tables, lengths, out, partial, lse, counters
    **{
        name: ("_decode_split_kernel", {0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
        for name in ("decode_split", "decode_split_merge", "decode_split_fp8", "decode_split_fp8_warps")
    },
}
WEIGHT_PREFETCH = {"gemv_rms_norm", "gemv", "gemv_silu_mul"}


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


REG = re.compile(r"%[\w.]+")


def before_wait(text: str, kernel: str, dependent: set[int]) -> dict:
    """Walk the instructions up to ``griddepcontrol.wait`` (straight-line code: the kernels load
    nothing in a loop before it), tainting every register computed from a dependent parameter."""
    tainted: set[str] = set()
    loads, bad_loads, stores, waited = 0, [], [], False
    for raw in text.splitlines():
        line = raw.split("//")[0].strip()
        if "griddepcontrol.wait" in raw:
            waited = True
            break
        m = re.match(r"(?:@!?%\w+\s+)?([a-z][\w.]*)\s*(.*);$", line)
        if not m:
            continue
        op, args = m.groups()
        if op.startswith("ld.param"):
            param = re.search(rf"{kernel}_param_(\d+)", args)
            if param and int(param.group(1)) in dependent:
                tainted.update(REG.findall(args.split(",")[0]))
            continue
        if op.startswith(("st.", "red.", "atom.")):
            stores.append(line)
            continue
        depth, cut = 0, len(args)
        for i, ch in enumerate(args):  # the destination is the first operand ({...} for vectors)
            depth += ch in "{[" and 1 or ch in "}]" and -1 or 0
            if ch == "," and depth == 0:
                cut = i
                break
        dst, src = REG.findall(args[:cut]), REG.findall(args[cut:])
        if op.startswith("ld.global"):
            loads += 1
            if any(r in tainted for r in src):
                bad_loads.append(line)
        if any(r in tainted for r in src):
            tainted.update(dst)
    return {"waited": waited, "loads": loads, "bad_loads": bad_loads, "stores": stores}


@pytest.mark.parametrize("name", sorted(DEPENDENT))
def test_nothing_dependent_is_touched_before_the_wait(ptx, name):
    kernel, dependent = DEPENDENT[name]
    text = ptx[name]
    assert "griddepcontrol.launch_dependents" in text
    assert text.index("griddepcontrol.wait") < text.index("griddepcontrol.launch_dependents")
    seen = before_wait(text, kernel, dependent)
    assert seen["waited"]
    assert not seen["stores"], seen["stores"]
    assert not seen["bad_loads"], seen["bad_loads"]
    if name in WEIGHT_PREFETCH:
        assert seen["loads"] > 0, "the GEMV should load its first weight tile before the wait"
    else:
        assert seen["loads"] == 0


def test_the_walk_sees_a_dependent_load_moved_above_the_wait(ptx):
    """The checker itself: swapping the wait below the first load of x must be caught."""
    text = ptx["gemv_rms_norm"]
    lines = text.splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    after = next(i for i in range(wait + 1, len(lines)) if "ld.global" in lines[i])
    moved = lines[:wait] + lines[wait + 1 : after + 1] + [lines[wait]] + lines[after + 1 :]
    seen = before_wait("\n".join(moved), "_gemv_kernel", DEPENDENT["gemv_rms_norm"][1])
    assert seen["bad_loads"]
