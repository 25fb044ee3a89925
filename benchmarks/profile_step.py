"""Where one decode step's time goes (CUDA): host phases and GPU phases, synchronised between.

python benchmarks/profile_step.py [--batch 1 256]
"""

import argparse
import json
import random
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.benchmark import write_random_qwen3
from nanovllm.engine.step import ModelRunnerOutput
from nanovllm.layers.sampler import SamplingMetadata


def add_requests(engine, rng, batch: int, steps: int) -> None:
    for _ in range(batch):
        prompt = [rng.randint(0, 10000) for _ in range(512)]
        engine.add_request(
            None, prompt, SamplingParams(temperature=0.6, max_tokens=steps + 2, ignore_eos=True)
        )


def profile(llm, batch: int, steps: int = 40) -> dict:
    engine, runner = llm.engine, llm.engine.executor
    rng = random.Random(0)
    add_requests(engine, rng, batch, steps)
    while engine.stats().num_waiting or any(s.num_completion_tokens == 0 for s in engine.scheduler.running):
        engine.step()  # prefill
    t = {k: 0.0 for k in ("schedule", "prepare", "metadata", "model", "sampler", "update", "step_total")}
    sched = engine.scheduler
    vocab = runner.config.hf_config.vocab_size
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        runner._update_states(out)
        ids, pos, ctx, sample_ids = runner.prepare_inputs(out)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        rows = [runner.seqs[i] for i in sample_ids]
        md = SamplingMetadata.build(rows, vocab, runner.device, runner.eos_token_ids)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        logits = runner.run_model(ids, pos, ctx)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        tokens = runner.sampler(logits, md).token_ids.tolist()
        t5 = time.perf_counter()
        engine._process(sched.update(out, ModelRunnerOutput(sample_ids, tokens)), None)
        t6 = time.perf_counter()
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0), strict=False):
            t[k] += v
    while engine.has_unfinished_requests():
        engine.step()
    add_requests(engine, rng, batch, steps)
    while engine.stats().num_waiting or any(s.num_completion_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    unsynced = (time.perf_counter() - start) / steps
    while engine.has_unfinished_requests():
        engine.step()
    res = {k: round(1e3 * v / steps, 3) for k, v in t.items()}
    res["engine_step_ms"] = round(1e3 * unsynced, 3)
    res["batch"] = batch
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    p.add_argument("--ckpt-dir", default="/tmp/nanovllm-qwen3-0.6b-random")
    args = p.parse_args()
    llm = LLM(write_random_qwen3(args.ckpt_dir), skip_tokenizer_init=True, max_model_len=4096)
    for b in args.batch:
        print(json.dumps({"profile_ms": profile(llm, b)}))
    llm.shutdown()


if __name__ == "__main__":
    main()
