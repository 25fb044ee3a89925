import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's CPU interpreter. Triton reads TRITON_INTERPRET when
# a kernel is first decorated, so it is set here, before any test module (a GPU test importing a
# kernel module included) is collected.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A factory: tiny_ckpt("qwen3") -> path of a cached tiny random checkpoint."""
    from tests.tiny import make_checkpoint

    cache = {}

    def get(arch: str = "qwen3") -> str:
        if arch not in cache:
            cache[arch] = make_checkpoint(str(tmp_path_factory.mktemp(arch)), arch)
        return cache[arch]

    return get
