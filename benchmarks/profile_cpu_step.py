"""Where one CPU decode step of the bundled SmolLM2 goes: torch ops counted and timed by torch.profiler.

The forward is driven directly (model runner's ``run_model`` with a hand-built decode Context), so the
figures are the model's alone: no scheduler, no sampling. ``--batch`` sequences each hold ``--context``
cached tokens (random K/V; attention cost does not depend on the values).

python benchmarks/profile_cpu_step.py [--batch 1 32] [--context 300] [--steps 20] [--top 25]
                                     [--compare-lean]  (lean CPU forward vs the modules', alternating)
"""

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM
from nanovllm.utils.context import Context


def decode_inputs(runner, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor, Context]:
    """A decode step of ``batch`` sequences at position ``context - 1``, blocks laid out one after another."""
    bs = runner.block_size
    per_seq = -(-context // bs)
    if batch * per_seq > runner.num_blocks:
        raise SystemExit(
            f"{batch} x {context} tokens need {batch * per_seq} blocks, the cache has {runner.num_blocks}"
        )
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    pos = context - 1
    ctx = Context(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32),
        max_seqlen_q=1,
        context_lens=torch.full((batch,), context, dtype=torch.int32),
        max_context_len=context,
        block_tables=tables,
        slot_mapping=(tables[:, pos // bs].long() * bs + pos % bs),
    )
    return torch.randint(0, 1000, (batch,)), torch.full((batch,), pos, dtype=torch.int64), ctx


def profile_step(llm: LLM, batch: int, context: int, steps: int, top: int, profile_steps: int = 5) -> dict:
    runner = llm.engine.executor
    ids, pos, ctx = decode_inputs(runner, batch, context)
    for _ in range(3):
        runner.run_model(ids, pos, ctx)
    times, cpu_times = [], []  # wall and this process's CPU seconds (less disturbed by a busy machine)
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        runner.run_model(ids, pos, ctx)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    cpu_ms = round(sorted(cpu_times)[len(cpu_times) // 2] * 1e3, 2)
    if not profile_steps:
        return {
            "batch": batch,
            "context": context,
            "step_ms": round(sorted(times)[steps // 2] * 1e3, 2),
            "step_cpu_ms": cpu_ms,
        }
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            runner.run_model(ids, pos, ctx)
    events = prof.key_averages()
    # Top-level aten ops only: children of an op (aten::linear -> aten::addmm) are counted in their parent.
    ops = sum(e.count for e in events if e.key.startswith("aten::")) / 5
    print(
        f"\n=== batch {batch}, context {context}: median step {sorted(times)[len(times) // 2] * 1e3:.2f} ms"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=top))
    by_self = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "batch": batch,
        "context": context,
        "step_ms": round(sorted(times)[len(times) // 2] * 1e3, 2),
        "step_cpu_ms": cpu_ms,
        "aten_ops_per_step": round(ops),
        "top_self_ms_per_step": {e.key: round(e.self_cpu_time_total / 5e3, 3) for e in by_self},
    }


def compare_lean(llm: LLM, batch: int, context: int, rounds: int = 6, steps: int = 5) -> dict:
    """Median step (wall and CPU ms) of the lean CPU forward against the modules' forward of the same
    packed model, alternating in this process (the module runs get the float32 embedding back)."""
    runner = llm.engine.executor
    model = runner.model.model
    ids, pos, ctx = decode_inputs(runner, batch, context)
    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(rounds):
        for lean in (False, True):
            model.lean_cpu = lean
            if not lean and getattr(model, "lean_embed", None) is not None:  # the C kernels' Q8_0 copy
                vocab = torch.arange(model.lean_embed.shape[0])
                model.embed_tokens.weight.data = model.lean_embed.rows(vocab)
                model.lean_embed = None
            elif not lean:
                model.embed_tokens.weight.data = model.embed_tokens.weight.data.float()
            runner.run_model(ids, pos, ctx)
            for _ in range(steps):
                t0, c0 = time.perf_counter(), time.process_time()
                runner.run_model(ids, pos, ctx)
                times[lean].append(((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))
    med = lambda v: round(sorted(v)[len(v) // 2], 2)  # noqa: E731
    out = {"batch": batch, "context": context}
    for lean, name in ((False, "modules"), (True, "lean")):
        out[f"{name}_step_ms"] = med([w for w, _ in times[lean]])
        out[f"{name}_step_cpu_ms"] = med([c for _, c in times[lean]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true", help="time the steps only")
    ap.add_argument("--compare-lean", action="store_true", help="lean forward vs modules, alternating")
    ap.add_argument("--engine-args", default="{}", help="JSON, e.g. '{\"quantization\": null}'")
    args = ap.parse_args()
    llm = LLM(None, max_model_len=512, **json.loads(args.engine_args))
    if args.compare_lean:
        out = [compare_lean(llm, b, args.context) for b in args.batch]
    else:
        out = [
            profile_step(llm, b, args.context, args.steps, args.top, 0 if args.no_profile else 5)
            for b in args.batch
        ]
    llm.shutdown()
    print(json.dumps({"bench": "cpu_decode_step_profile", "threads": torch.get_num_threads(), "runs": out}))


if __name__ == "__main__":
    main()
