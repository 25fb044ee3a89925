"""scripts/gpu_serve_check.sh end to end on the CPU, with a tiny checkpoint that has no tokenizer
(as the GPU's random Qwen3 checkpoint has none), both server designs (engine in a process, and in a
thread) as the device call runs them: that call must not be the first run of the script."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.tiny import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_gpu_serve_check_script_runs_on_cpu(tmp_path):
    model = str(tmp_path / "model")
    make_checkpoint(model)
    for name in os.listdir(model):  # token-id prompts only, like the GPU checkpoint
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(os.path.join(model, name))
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        MODEL=model,
        NUM_PROMPTS="4",
        INPUT_LEN="8 24",
        OUTPUT_LEN="4 8",
        RUNS="1",
        ENGINES="process,thread",
        ENGINE_ARGS=json.dumps({"max_model_len": 128, "device": "cpu", "skip_tokenizer_init": True}),
        OUT=str(out),
    )
    proc = subprocess.run(
        ["bash", "scripts/gpu_serve_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "server/offline output tok/s" in proc.stdout
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["engine"] for r in results] == ["process", "thread"]
    for result in results:
        (load,) = result["server"]
        assert load["completed"] == 4 and load["failed"] == 0
        # The server's CPU, per thread in nanoseconds from /proc (bench_serve._cpu_seconds): the event
        # loop is one of the server's threads, read in the same pass (rounded to 10 ms, it may be 0).
        assert load["event_loop_cpu_s"] >= 0 and load["server_cpu_s"] >= 0
        assert load["event_loop_cpu_s"] <= load["server_cpu_s"]
        assert load["event_loop_us_per_token"] >= 0
        # the engine process's CPU is counted apart from the server's; in a thread it is the server's
        assert (load["engine_process_cpu_s"] > 0) == (result["engine"] == "process")
        if result["engine"] == "thread":
            assert load["server_cpu_s"] > 0
        # ignore_eos: every request produced exactly its max_tokens, through the server and offline
        offline = result["baseline"]["offline_generate_before_and_after"]
        assert load["output_tokens"] == offline[0]["output_tokens"] == offline[1]["output_tokens"]
        assert result["server_over_offline"] > 0
    shutil.rmtree(model)
