"""Per-request sampling parameters and the error raised for bad request input.

Validation lives here so every front door (CLI, gRPC router, Python) rejects the same inputs with
the same sentences: each error names the field and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GREEDY_BELOW", "InvalidRequestError", "QueueFullError", "SamplingParams"]

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
# The rule for numerically degenerate temperatures: below this, dividing the logits by the
# temperature overflows float32 into inf/NaN probabilities, and the distribution is a point mass
# on the argmax anyway, so the request is sampled greedily (vLLM's _SAMPLING_EPS is the same).
GREEDY_BELOW = 1e-5
MAX_TEMPERATURE = 100.0  # flatter than this is uniform noise in float32; finite is required
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as in the gRPC API


class InvalidRequestError(ValueError):
    """Bad request input. `field` names the offending field (e.g. `sampling.top_p`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full; the caller should retry later or elsewhere."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    seed: int | None = None  # same seed (and prompt) -> same tokens
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides EOS
    ignore_eos: bool = False  # keep generating past EOS
    logprobs: int | None = None  # None: off; n >= 0: sampled token's logprob + top n

    @property
    def greedy(self) -> bool:
        """Argmax sampling: temperature 0, or below GREEDY_BELOW (numerically a point mass)."""
        return self.temperature < GREEDY_BELOW

    def validate(self, vocab_size: int | None = None) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequestError(
                "max_tokens", f"must be a positive integer, got {self.max_tokens}"
            )
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also rejects NaN and inf
            raise InvalidRequestError(
                "temperature",
                f"must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 means greedy; values "
                f"below {GREEDY_BELOW:g} are treated as greedy), got {self.temperature}",
            )
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise InvalidRequestError(
                "seed", f"must fit in a signed 64-bit integer, got {self.seed}"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(
                "top_p", f"must be in (0, 1] (1 disables nucleus sampling), got {self.top_p}"
            )
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"
            )
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    "stop", f"each stop string must have 1..{MAX_STOP_STRING_CHARS} characters"
                )
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise InvalidRequestError(
                        "stop_token_ids",
                        f"token id {t} is outside the vocabulary [0, {vocab_size})",
                    )
