"""Exploration: a Triton GEMM for decode batches (M = 16..256 rows) against cuBLAS, at Qwen3-0.6B's
projection shapes. The kernel computes y^T = W @ x^T, so the weight rows fill the tensor cores' M
side (64/128) and the few token rows are their N side (16..256). Each (shape, M) is timed as 28
calls on 28 different weights (as the 28 layers: no L2 reuse), replayed from one CUDA graph.

Measured on an H200 (2026-12-04, benchmarks/results.jsonl "gemm_explore"): cuBLAS won at every
shape and M but down_proj at M = 16 (7.95 against 8.02 us), so the engine keeps cuBLAS for M > 4.

python benchmarks/bench_gemm.py [--out FILE]
"""

import argparse
import json
from datetime import datetime, timezone

import torch
import triton
import triton.language as tl

from nanovllm.benchmark import git_commit

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}
LAYERS = 28


@triton.jit
def _gemm_swap_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, BW: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    pid_w = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows_w = pid_w * BW + tl.arange(0, BW)
    rows_t = pid_t * BT + tl.arange(0, BT)
    ks = tl.arange(0, BK)
    k_per = tl.cdiv(K, SPLIT_K * BK) * BK
    k0 = pid_k * k_per
    acc = tl.zeros([BW, BT], dtype=tl.float32)
    w_mask = rows_w < N
    t_mask = rows_t < M
    for k in range(k0, tl.minimum(k0 + k_per, K), BK):
        w = tl.load(w_ptr + rows_w[:, None] * stride_wn + (k + ks)[None, :], mask=w_mask[:, None])
        x = tl.load(x_ptr + rows_t[:, None] * stride_xm + (k + ks)[None, :], mask=t_mask[:, None])
        acc = tl.dot(w, tl.trans(x), acc)
    offs = rows_t[None, :] * stride_ym + rows_w[:, None]
    mask = w_mask[:, None] & t_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptr + offs, acc, mask=mask, sem="relaxed")


def gemm(x, w, cfg, out=None):
    M, K = x.shape
    N = w.shape[0]
    bw, bt, bk, split, warps, stages = cfg
    if split > 1:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, bw), triton.cdiv(M, bt), split)
    _gemm_swap_kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BW=bw, BT=bt, BK=bk,
                            SPLIT_K=split, num_warps=warps, num_stages=stages)  # fmt: skip
    return y if split == 1 else y.to(x.dtype)


def time_graph(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=5, rep=40) * 1e3 / LAYERS  # us a call


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--ms", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    args = p.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x @ ws[0].t()
            cublas = time_graph(lambda x=x, ws=ws: [torch.nn.functional.linear(x, w) for w in ws])
            bt0 = max(16, min(256, triton.next_power_of_2(m)))
            results = []
            for bw in (64, 128):
                for bt in {bt0, max(16, bt0 // 2)}:
                    for bk in (64, 128):
                        for split in (1, 2, 4) if n <= 2048 else (1,):
                            for stages in (4 if bk == 64 else 3,):
                                cfg = (bw, bt, bk, split, 4, stages)
                                try:
                                    y = gemm(x, ws[0], cfg)
                                    err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
                                    err = err.item()
                                    if err > 2e-2:
                                        print(name, m, cfg, "wrong", err)
                                        continue
                                    us = time_graph(lambda x=x, ws=ws, cfg=cfg: [gemm(x, w, cfg) for w in ws])
                                except Exception as e:  # noqa: BLE001 (e.g. out of shared memory)
                                    print(name, m, cfg, type(e).__name__)
                                    continue
                                results.append((us, cfg))
            results.sort()
            best = results[0] if results else (float("nan"), None)
            bound = (n * k * 2 + m * k * 2 + m * n * 2) / 4.2e6  # us at ~4.2 TB/s
            row = {"shape": name, "n": n, "k": k, "m": m, "cublas_us": round(cublas, 2),
                   "triton_best_us": round(best[0], 2), "best_cfg": best[1],
                   "top3": [(round(u, 2), c) for u, c in results[:3]],
                   "bw_bound_us": round(bound, 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    rec = {"bench": "gemm_explore", "device": torch.cuda.get_device_name(), "commit": git_commit(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows,
           "workload": "Qwen3-0.6B projections, 28 weights a graph, bf16",
           "baseline": "torch.nn.functional.linear (cuBLAS), same run"}  # fmt: skip
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
