"""Sweep the decode GEMV's block sizes at the Qwen3-0.6B shapes against cuBLAS (F.linear), bf16.

    python benchmarks/bench_gemv.py [results.jsonl] [--quick] [--norm]

For each projection (qkv 1024->4096, o 2048->1024, gate_up 1024->6144, down 3072->1024, lm_head
1024->151936) and M = 1, 2, 4 rows it prints one JSON line: the best config, its us and GB/s, the
config the table (``GEMV_CONFIGS``) picks today and its us, and F.linear's us and GB/s. M=1 sweeps
every candidate; M=2 and 4 only M=1's best few (and each with half the BLOCK_K), to keep the
compile count down. The last line holds a ready-to-paste ``GEMV_CONFIGS`` and the estimated
saving per decode step of a 28-layer model at M=1.

``--norm`` times instead the decoder's add + RMSNorm followed by the qkv / gate_up GEMV (two
kernels, as without the fusion) against ``gemv_rms_norm`` (one) at a few BLOCK_N, M = 1 and 2.

Timed as the engine runs them: from a CUDA graph, cycling through enough copies of the weight
(>= 4x the L2 cache) that no call finds its weight in L2, as in a real decode step.
"""

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanovllm.benchmark import git_commit  # noqa: E402
from nanovllm.kernels.gemv import GemvConfig, config_for, gemv, gemv_rms_norm  # noqa: E402
from nanovllm.layers.layernorm import add_rms_norm  # noqa: E402

SHAPES = {  # name: (N, K), as the weight is [N, K]
    "qkv": (4096, 1024),
    "o": (1024, 2048),
    "gate_up": (6144, 1024),
    "down": (1024, 3072),
    "lm_head": (151936, 1024),
}
LAYERS = 28
DTYPE = torch.bfloat16
COLD_BYTES = 256 << 20  # weight copies cycled per graph replay: several times any L2


def candidates(n: int, k: int, quick: bool) -> list[GemvConfig]:
    out = []
    # Loads in the K loop are not software-pipelined (no tl.dot), so a program waits a full DRAM
    # round trip per tile: few large tiles per program (large BLOCK_K, K split) may win.
    for block_n in (2, 4, 8, 16, 32, 64):
        for block_k in (256, 512, 1024, 2048, 4096):  # 4096 for K=3072: one masked tile
            if not 1024 <= block_n * block_k <= 16384 or block_k > triton.next_power_of_2(k):
                continue
            programs = triton.cdiv(n, block_n)
            for split_k in (1, 2, 3, 4) if programs < 512 else (1,):
                if split_k > 1 and (k % (split_k * block_k) or k // split_k < block_k):
                    continue  # only splits into whole tiles
                for warps in (4,) if quick else (4, 8):
                    out.append(GemvConfig(block_n, block_k, split_k, warps))
    return out


def time_us(run, copies: int) -> float:
    """Per call, from a graph of ``copies`` calls (run(i) uses weight copy i)."""
    for i in range(min(copies, 2)):
        run(i)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            run(i)
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=30, return_mode="median")
    del graph
    return 1e3 * ms / copies


def bench_shape(name: str, n: int, k: int, quick: bool) -> list[dict]:
    weight_bytes = n * k * DTYPE.itemsize
    copies = max(2, math.ceil(COLD_BYTES / weight_bytes))
    weights = [torch.randn(n, k, dtype=DTYPE, device="cuda") / k**0.5 for _ in range(copies)]
    x_full = torch.randn(4, 2 * k, dtype=DTYPE, device="cuda")
    lines, top = [], []
    for m in (1, 2, 4):
        x = x_full[:m, :k].contiguous()
        moved = weight_bytes + m * (n + k) * DTYPE.itemsize
        if m == 1:
            configs = candidates(n, k, quick)
        else:
            halved = [c._replace(block_k=c.block_k // 2) for c in top if c.block_k >= 512]
            configs = list(dict.fromkeys(top + halved))
        results = {}
        for cfg in configs:
            try:
                results[cfg] = time_us(lambda i, x=x, c=cfg: gemv(x, weights[i], config=c), copies)
            except Exception as e:  # a config the compiler rejects (registers, shared memory)
                print(f"# {name} M={m} {tuple(cfg)}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        ranked = sorted(results, key=results.get)
        if m == 1:
            top = ranked[:6]
        best = ranked[0]
        table_cfg = config_for(m, n, k)
        table_us = time_us(lambda i, x=x: gemv(x, weights[i]), copies) if table_cfg else None
        cublas_us = time_us(lambda i, x=x: F.linear(x, weights[i]), copies)
        err = (gemv(x, weights[0], config=best).float() - F.linear(x, weights[0]).float()).abs().max().item()
        line = {
            "bench": "gemv", "shape": name, "N": n, "K": k, "M": m, "configs_timed": len(results),
            "best": best._asdict(), "us": round(results[best], 2),
            "gbs": round(moved / results[best] / 1e3, 1),
            "table": table_cfg._asdict() if table_cfg else "cublas",
            "table_us": round(table_us, 2) if table_us else None,
            "cublas_us": round(cublas_us, 2), "cublas_gbs": round(moved / cublas_us / 1e3, 1),
            "speedup_vs_cublas": round(cublas_us / results[best], 2), "max_abs_diff_vs_cublas": err,
            "runner_up": [[tuple(c), round(results[c], 2)] for c in ranked[1:4]],
        }  # fmt: skip
        if name == "down":  # the MLP's fused prologue: x is [M, 2K] = [gate | up]
            xa = x_full[:m].contiguous()
            act_us = time_us(lambda i, x=xa, c=best: gemv(x, weights[i], act="silu_mul", config=c), copies)
            line["silu_mul_us"] = round(act_us, 2)
        print(json.dumps(line), flush=True)
        lines.append(line)
    weights.clear()
    torch.cuda.empty_cache()
    return lines


def bench_norm(name: str, n: int, k: int) -> list[dict]:
    """add_rms_norm then the GEMV, against gemv_rms_norm, per call (us)."""
    copies = max(2, math.ceil(COLD_BYTES / (n * k * DTYPE.itemsize)))
    weights = [torch.randn(n, k, dtype=DTYPE, device="cuda") / k**0.5 for _ in range(copies)]
    norm_w = torch.ones(k, dtype=DTYPE, device="cuda")
    lines = []
    for m in (1, 2):
        x, res = (torch.randn(m, k, dtype=DTYPE, device="cuda") for _ in range(2))
        cfg = config_for(m, n, k) or GemvConfig(2, 1024)

        def unfused(i, x=x, res=res, cfg=cfg):
            h, _ = add_rms_norm(x, res, norm_w, 1e-6)
            return gemv(h, weights[i], config=cfg)

        line = {"bench": "gemv_rms_norm", "shape": name, "N": n, "K": k, "M": m, "table": tuple(cfg)}
        line["unfused_us"] = round(time_us(unfused, copies), 2)
        for block_n in (1, 2, 4, 8, 16):
            c = cfg._replace(block_n=block_n)

            def fused(i, x=x, res=res, c=c):
                return gemv_rms_norm(x, res, norm_w, 1e-6, weights[i], config=c)

            line[f"fused_us_bn{block_n}"] = round(time_us(fused, copies), 2)
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def summary(lines: list[dict]) -> dict:
    table = {}
    for ln in lines:
        cfg = tuple(GemvConfig(**ln["best"]))
        if ln["speedup_vs_cublas"] < 1.0:
            cfg = None  # leave this shape to cuBLAS
        key = (ln["N"], ln["K"]) if ln["M"] == 1 else (ln["N"], ln["K"], ln["M"])
        if ln["M"] == 1 or cfg != table.get((ln["N"], ln["K"])):
            table[key] = cfg
    m1 = {ln["shape"]: ln for ln in lines if ln["M"] == 1}
    per_layer = [s for s in ("qkv", "o", "gate_up", "down") if s in m1]
    saved = LAYERS * sum(m1[s]["cublas_us"] - m1[s]["us"] for s in per_layer)
    if "lm_head" in m1:
        saved += max(0.0, m1["lm_head"]["cublas_us"] - m1["lm_head"]["us"])
    paste = "GEMV_CONFIGS = {\n" + "".join(
        f"    {k}: {'None' if v is None else 'GemvConfig' + str(v)},\n" for k, v in table.items()
    ) + "}"  # fmt: skip
    print(paste)
    return {
        "bench": "gemv_summary",
        "est_us_saved_per_decode_step_m1": round(saved, 1),
        "gemv_configs": {str(k): v for k, v in table.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", help="append the JSON lines here too")
    parser.add_argument("--quick", action="store_true", help="4 warps only")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--norm", action="store_true", help="the fused norm prologue (qkv, gate_up)")
    args = parser.parse_args()
    start = time.perf_counter()
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    lines = []
    if args.norm:
        for name in ("qkv", "gate_up"):
            lines += bench_norm(name, *SHAPES[name])
        final = {"bench": "gemv_rms_norm_summary"}
    else:
        for name in args.shapes.split(","):
            lines += bench_shape(name, *SHAPES[name], args.quick)
        final = summary(lines)
    final |= {"seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(final))
    if args.results:
        with open(args.results, "a") as f:
            for ln in [*lines, final]:
                f.write(json.dumps(meta | ln) + "\n")


if __name__ == "__main__":
    main()
