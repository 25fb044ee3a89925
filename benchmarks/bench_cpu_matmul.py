"""Which CPU matmul is fastest for SmolLM2-135M's weights: dense float32 / bfloat16 against torch's
packed int4 (group-wise scale and zero) and int8 (per-channel) kernels, and our C kernels on the raw
GGUF blocks (kernels/cpu/: ``c_q4_1`` layers with a ``Q8_0`` lm_head, as in the bundled GGUF).

Each format gets 30 copies of one decoder layer's four projections plus the 49k-row lm_head, so the
weights stream from memory as they do in a real decode step (the L3 cache holds about one layer).
Prints milliseconds per model pass (median of a few) for batch sizes 1 and 32; one JSON line at the end.
Usage: python benchmarks/bench_cpu_matmul.py [--layers 30] [--repeats 5]
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

GROUP = 32
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LM_HEAD = (49152, 576)


def make(fmt: str, n: int, k: int):
    """A callable x -> x @ W.T for one random weight in format ``fmt``."""
    if fmt in ("f32", "bf16"):
        w = torch.randn(n, k, dtype=torch.float32 if fmt == "f32" else torch.bfloat16)
        return lambda x: F.linear(x, w)
    if fmt.startswith("int4"):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32), 2
        )
        dtype = torch.float32 if fmt == "int4_f32" else torch.bfloat16
        sz = torch.randn(k // GROUP, n, 2, dtype=dtype)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)
    if fmt.startswith("c_"):
        from nanovllm.kernels.cpu import ops

        qtype = "Q8_0" if n == LM_HEAD[0] else fmt[2:].upper()
        nbytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
        raw = torch.randint(0, 256, (n, k // 32, nbytes), dtype=torch.uint8)
        raw[:, :, :2] = torch.tensor([0x00, 0x20], dtype=torch.uint8)  # float16 0.0078125 scales
        return ops.QMatmul(raw.view(n, -1), qtype)
    if fmt.startswith("int8"):
        w = torch.randint(-128, 127, (n, k), dtype=torch.int8)
        s = torch.rand(n, dtype=torch.float32 if fmt == "int8" else torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, w, s)
    raise ValueError(fmt)


def pass_ms(fmt: str, m: int, layers: int, repeats: int) -> dict:
    dtype = torch.float32 if fmt in ("f32", "int4_f32", "int8") or fmt.startswith("c_") else torch.bfloat16
    fns = [(make(fmt, n, k), k) for _ in range(layers) for n, k in LAYER]
    head = make(fmt, *LM_HEAD)
    xs = {k: torch.randn(m, k, dtype=dtype) for k in (576, 1536)}
    times_layers, times_head = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for fn, k in fns:
            fn(xs[k])
        t1 = time.perf_counter()
        head(xs[576])
        times_layers.append((t1 - t0) * 1e3)
        times_head.append((time.perf_counter() - t1) * 1e3)
    med = lambda v: round(sorted(v[1:])[len(v[1:]) // 2], 2)  # noqa: E731 (first pass is a warm-up)
    return {"layers_ms": med(times_layers), "lm_head_ms": med(times_head)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--formats", default="int4_bf16,c_q4_1,c_q4_0,f32,bf16,int4_f32,int8,int8_bf16")
    args = ap.parse_args()
    out = {"bench": "cpu_matmul_formats", "threads": torch.get_num_threads(), "torch": torch.__version__}
    for m in (1, 32):
        for fmt in args.formats.split(","):
            r = pass_ms(fmt, m, args.layers, args.repeats)
            out[f"{fmt}_m{m}"] = r
            layers, head = r["layers_ms"], r["lm_head_ms"]
            print(f"batch {m:2d} {fmt:10s} layers {layers:8.2f} ms  lm_head {head:8.2f} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
