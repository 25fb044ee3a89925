"""Building the CPU C kernels (kernels/cpu/build.py) in real processes: two at once into an empty cache,
and the fallback to torch's int4 kernel when there is no working compiler."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanovllm.kernels.cpu import build

ROOT = Path(__file__).resolve().parents[2]

# Loads the kernels (building them if needed) and checks a packed matmul against a float reference;
# prints whether the C kernels ran.
SCRIPT = """
import logging, numpy as np, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from nanovllm.kernels.cpu import ops
from nanovllm.layers.quantization import PackedWeight, dequantize
rng = np.random.default_rng(0)
d = rng.uniform(0.001, 0.05, (64 * 4, 1)).astype(np.float16).view(np.uint8)
m = rng.uniform(-0.4, 0.0, (64 * 4, 1)).astype(np.float16).view(np.uint8)
q = rng.integers(0, 256, (64 * 4, 16), dtype=np.uint8)
raw = torch.from_numpy(np.concatenate([d, m, q], 1).reshape(64, 80))
w = PackedWeight(raw, "Q4_1")
x = torch.randn(3, 128)
ref = x @ dequantize(raw, "Q4_1").T
assert (w.matmul(x) - ref).norm() < 0.02 * ref.norm()
print("C kernels" if ops.available() else "torch fallback", w.qmatmul is not None)
"""


def run(env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    env.pop("NANOVLLM_CPU_KERNELS", None)
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    "cc,reason",
    [("/nonexistent/cc", "no C compiler: /nonexistent/cc not found"), ("false", "failed")],
)
def test_without_a_working_compiler_the_torch_path_runs_with_one_log_line(tmp_path, cc, reason):
    proc = run({"CC": cc, "XDG_CACHE_HOME": str(tmp_path)})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == ["torch", "fallback", "False"]
    lines = [line for line in err.splitlines() if "CPU C kernels unavailable" in line]
    assert len(lines) == 1 and reason in lines[0], err
    assert not list(tmp_path.rglob("*.tmp"))  # a failed build leaves nothing behind


@pytest.mark.slow
@pytest.mark.skipif(
    build.compiler() is None or not build.NEEDED_FLAGS <= build.cpu_flags(), reason="no cc/AVX2"
)
def test_two_processes_build_into_an_empty_cache_at_once(tmp_path):
    procs = [run({"XDG_CACHE_HOME": str(tmp_path)}) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.split() == ["C", "kernels", "True"], err
    libs = list((tmp_path / "nanovllm" / "kernels").iterdir())
    assert len(libs) == 1 and libs[0].suffix == ".so", libs  # one name; the losing rename replaced it
    # a third process loads the cached library without building (no "built" line)
    proc = run({"XDG_CACHE_HOME": str(tmp_path)})
    out, err = proc.communicate(timeout=120)
    assert out.split() == ["C", "kernels", "True"] and "built the CPU C kernels" not in err
