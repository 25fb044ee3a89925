"""How to pick tokens for one request. Pure Python: no torch.

Field names, defaults and allowed ranges follow vLLM's ``SamplingParams`` (which follows the
OpenAI API), except ``max_tokens`` which defaults to 64 as in Nano-vLLM.
"""

import math
import numbers
import struct
from dataclasses import dataclass

# Temperatures below this are treated as greedy (vLLM uses the same epsilon).
SAMPLING_EPS = 1e-5
# Most top logprobs a request may ask for (the OpenAI API's cap).
MAX_LOGPROBS = 20
# Seeds are 64-bit, signed or unsigned, as torch.Generator.manual_seed takes them.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Integer fields that reach int64 tensors (top_k) or int64 counters stay below this.
INT64_MAX = 2**63 - 1


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _integer(name: str, value: object) -> int:
    """``value`` as a Python int; bools and floats (even 5.0) are not integers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {_show(value)}")
    return int(value)


def _float32(value: float) -> float:
    """``value`` rounded to float32, the precision the sampler computes in (inf or OverflowError if too
    big for it)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _real(name: str, value: object) -> float:
    """``value`` as a finite Python float that stays finite in float32 (the sampler's dtype)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_show(value)}")
    try:
        value = float(value)
        finite = math.isfinite(_float32(value))
    except OverflowError:
        value, finite = math.inf, False
    if not finite:
        raise ValueError(f"{name} must be a finite number (float32 range, |x| <= 3.4e38), got {value!r}")
    return value


@dataclass
class SamplingParams:
    """Sampling options of one request.

    ``temperature=0`` means greedy decoding. ``top_k=0`` and ``top_k=-1`` both mean "off"
    (stored as 0). ``stop`` and ``stop_token_ids`` are normalised to lists. ``logprobs=N``
    asks for the N most likely tokens of the raw model distribution at every step, plus the
    sampled token. ``n > 1`` is fanned out by the engine; with a ``seed``, child ``i`` uses
    ``seed + i`` (as vLLM does) so the children differ.

    Every field is checked by :meth:`validate`, which ``__post_init__`` calls and the engine
    calls again when a request is added, so a field assigned after construction
    (``sp.n = 0``) is caught there too. Any problem raises ``ValueError`` naming the field.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int = 64
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and normalise it in place (idempotent).

        Accepted (as vLLM): ``n >= 1``; presence and frequency penalties in [-2, 2];
        ``repetition_penalty > 0``; ``temperature >= 0``; ``top_p`` in (0, 1]; ``top_k`` -1, 0 or
        >= 1; ``min_p`` in [0, 1]; ``max_tokens >= 1``; ``0 <= min_tokens <= max_tokens``;
        ``logprobs`` None or in [0, MAX_LOGPROBS]. Beyond vLLM: floats must be finite in float32
        (``temperature=inf`` would turn logits into NaN), ``seed`` and every child's ``seed + i``
        must fit 64 bits, and numbers must be numbers (no str, no bool; integers may not be floats).
        Numpy scalars are accepted and stored as Python ints and floats.
        """
        self.n = _integer("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")
        self._check_floats()
        self.top_k = _integer("top_k", self.top_k)
        if not -1 <= self.top_k <= INT64_MAX:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            if not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1):
                raise ValueError(
                    f"seed must be None or an integer in [-2**63, 2**64 - 1] (with n={self.n}, child i "
                    f"uses seed + i, so at most 2**64 - {self.n}), got {self.seed}"
                )
        self._check_stops()
        self.max_tokens = _integer("max_tokens", self.max_tokens)
        if not 1 <= self.max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        self.min_tokens = _integer("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs}"
                )
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {_show(getattr(self, name))}")

    def _check_floats(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        # Exclusive lower bounds hold in float32 too: 1e-50 would reach the sampler as 0.
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if not (self.repetition_penalty > 0 and _float32(self.repetition_penalty) > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.temperature = _real("temperature", self.temperature)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not (0.0 < self.top_p <= 1.0 and _float32(self.top_p) > 0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {_show(stop)}")
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must hold non-empty strings only, got {list(stop)!r}")
        self.stop = list(stop)

        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {_show(ids)}")
        ids = [_integer("each of stop_token_ids", t) for t in ids]
        if not all(0 <= t <= INT64_MAX for t in ids):
            raise ValueError(f"stop_token_ids must be integers >= 0, got {ids}")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalty on: sampling reads every earlier token."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
