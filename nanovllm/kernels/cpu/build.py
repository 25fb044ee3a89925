"""Build the C kernels of this folder on first use, cache the shared library, load it with ctypes.

The library is compiled with the system C compiler (``$CC``, else ``cc``) and ``-march=native`` into
``$XDG_CACHE_HOME/nanovllm/kernels`` (``~/.cache/nanovllm/kernels`` by default) under a name keyed by
a hash of the source, the flags, the compiler (its resolved path, size and mtime) and the CPU's feature
flags, so an edit, another compiler or another CPU builds afresh. The compiler writes to a temporary
file in the same folder which is then renamed over the final name: ``os.replace`` is atomic, so two
processes starting at once each build and one rename wins, and nobody loads a half-written file.

Linked with ``-fopenmp``, the library binds to the ``libgomp.so.1`` torch has already loaded (same
soname), so its parallel regions run on torch's own OpenMP threads rather than a second pool.

No compiler, a CPU without AVX2/FMA/F16C, a failed build or ``NANOVLLM_CPU_KERNELS=0``: ``load()``
returns None, with one log line, and callers keep their torch path.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from nanovllm.utils.cpu import cpu_flags

logger = logging.getLogger("nanovllm")

SOURCES = [Path(__file__).with_name(name) for name in ("quant_matmul.c", "layer_ops.c", "decode_step.c")]
HEADERS = [Path(__file__).with_name("cpu_kernels.h")]
FLAGS = ["-O3", "-march=native", "-std=c11", "-fopenmp", "-shared", "-fPIC"]
NEEDED_FLAGS = {"avx2", "fma", "f16c"}
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # C function -> (argument types, return type)
    "qmatmul": ([_P, _I, _I, _I, _P, _I, _P, _I], _I),
    "dequant_rows": ([_P, _I, _I, _P, _I, _P], None),
    "repack_rows": ([_P, _I, _I, _I, _P], None),
    "unpack_rows": ([_P, _I, _I, _I, _P], None),
    "packed_bytes": ([_I, _I, _I], ctypes.c_size_t),
    "quantize_q8_0": ([_P, _I, _I, _P, _I], None),
    "add_rms_norm": ([_P, _P, _P, _F, _I, _I, _P], None),
    "rope": ([_P, _I, _I, _I, _I, _P, _P], None),
    "silu_mul": ([_P, _I, _I, _P], None),
    "decode_attention": ([_P, _I, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _I, _F, _P, _I], _I),
    "decode_step_workspace": ([_P, _I, _I, _I], ctypes.c_size_t),
    "decode_step": ([_P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _I], _I),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanovllm" / "kernels"


def compiler() -> str | None:
    """The C compiler's resolved path: ``$CC`` if set (even when it does not exist), else ``cc``."""
    cc = os.environ.get("CC") or "cc"
    found = shutil.which(cc)
    return os.path.realpath(found) if found else None


def library_key(cc: str) -> str:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    st = os.stat(cc)
    h.update(" ".join([*FLAGS, cc, str(st.st_size), str(st.st_mtime_ns)]).encode())
    h.update(" ".join(sorted(cpu_flags())).encode())
    return h.hexdigest()[:20]


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *map(str, SOURCES), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unavailable(reason: str) -> None:
    logger.warning("CPU C kernels unavailable (%s): using torch's packed int4 kernel instead", reason)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The kernels' library, built if needed; None (logged once) where they cannot be had."""
    if os.environ.get("NANOVLLM_CPU_KERNELS", "1") == "0":
        _unavailable("NANOVLLM_CPU_KERNELS=0")
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not NEEDED_FLAGS <= cpu_flags():
        _unavailable(f"the CPU lacks one of {sorted(NEEDED_FLAGS)}")
        return None
    cc = compiler()
    if cc is None:
        _unavailable(f"no C compiler: {os.environ.get('CC') or 'cc'} not found; install gcc or set CC")
        return None
    try:
        import torch  # noqa: F401  (loads torch's libgomp first, which the library then shares)

        path = cache_dir() / f"nanovllm_cpu_{library_key(cc)}.so"
        if not path.exists():
            _build(cc, path)
            logger.info("built the CPU C kernels: %s", path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _unavailable(str(e))
        return None
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib
