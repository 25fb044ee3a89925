"""ggml's tensor types (a GGUF tensor's type id) and their block geometry, without importing gguf-py.

The types nearly every GGUF file holds are listed here, so that reading the bundled model's header and
weights needs no gguf-py (its import is ~40 ms of a 2-core machine's start-up); any other id is looked
up in gguf-py's tables, which tests/models/test_gguf.py also checks this table against.
"""

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class GGMLType:
    """One ggml type: ``block_size`` weights stored in ``type_size`` bytes (1 and the element size for
    the float types)."""

    id: int
    name: str
    block_size: int
    type_size: int

    def row_bytes(self, width: int) -> int:
        """Bytes of ``width`` weights (a whole number of blocks)."""
        return width // self.block_size * self.type_size


# id -> (name, weights per block, bytes per block)
COMMON_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}


@cache
def ggml_type(type_id: int) -> GGMLType:
    """The type with id ``type_id``; ``ValueError`` naming it when neither this table nor gguf-py knows it."""
    if type_id in COMMON_TYPES:
        return GGMLType(type_id, *COMMON_TYPES[type_id])
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(
            f"ggml tensor type {type_id} is unknown to this gguf package; upgrade it (pip install -U gguf)"
        ) from None
    return GGMLType(type_id, qtype.name, *GGML_QUANT_SIZES[qtype])
