"""Per-request sampling parameters, with vLLM's names and meanings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # most top logprobs a request may ask for
# stop strings are matched on every token of every choice: bounded so that one request cannot stall
# the event loop (100k stops froze a server for 54 s) or hold gigabytes (n x stops copies)
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256
LOGIT_BIAS_LIMIT = 100.0  # biases are clamped to [-100, 100] (as vLLM's OpenAI layer does)
_GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to sample one request. Invalid values raise ValueError naming the field.

    temperature 0 (anything below 1e-5) means greedy. ``stop`` strings end
    generation and are not part of the returned text (unless
    ``include_stop_str_in_output``); ``stop_token_ids`` and the model's eos ids
    end it too (unless ``ignore_eos``, which only disables eos).

    Processing order (vLLM v1): logit_bias and min_tokens masking, then
    repetition/frequency/presence penalties, then greedy argmax or temperature
    -> min_p -> top_k -> top_p -> sample. ``repetition_penalty`` applies to the
    tokens of the prompt and of the output; ``presence_penalty`` and
    ``frequency_penalty`` to the output only. ``logprobs`` are those of the raw
    model output (before bias, penalties and temperature).
    """

    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 or -1: all)"})
    max_tokens: int = field(default=16, metadata={"help": "most tokens to generate"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop string, not included in the output"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "token ids that end generation"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past end-of-sequence tokens"})
    seed: int | None = field(default=None, metadata={"help": "per-request sampling seed"})
    min_p: float = field(default=0.0, metadata={
        "help": "drop tokens less likely than min_p times the most likely one, in [0, 1] (0: off)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "> 0; penalise tokens already in the prompt or output (1: off)"})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "in [-2, 2]; subtracted from the logit of every token already generated"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "in [-2, 2]; subtracted once per earlier occurrence of a token in the output"})
    logit_bias: dict[int, float] = field(default_factory=dict, metadata={
        "help": "token id -> bias added to its logit (clamped to [-100, 100])"})
    min_tokens: int = field(default=0, metadata={
        "help": "generate at least this many tokens before eos or a stop token id may end the request"})
    logprobs: int | None = field(default=None, metadata={
        "help": f"return the logprobs of this many most likely tokens (0..{MAX_LOGPROBS}; 0: the sampled one only)"})
    n: int = field(default=1, metadata={"help": "number of completions per prompt"})
    skip_special_tokens: bool = field(default=True, metadata={"help": "leave special tokens out of the text"})
    include_stop_str_in_output: bool = field(default=False, metadata={
        "help": "keep the matched stop string at the end of the text"})

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = self._check_logit_bias(self.logit_bias)

        if not _is_number(self.temperature) or not (0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}"[:300])
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @staticmethod
    def _check_logit_bias(bias) -> dict[int, float]:
        if bias is None:
            return {}
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            tok = key
            if isinstance(key, str) and key.isascii() and key.isdigit():  # JSON object keys are strings
                tok = int(key)
            if not _is_int(tok) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
            if not _is_number(value) or math.isnan(value):
                raise ValueError(f"logit_bias[{tok}] must be a number, got {value!r}")
            out[tok] = float(min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, value)))
        return out

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check the token ids in these params against the model's vocabulary size."""
        bad = sorted(t for t in self.logit_bias if t >= vocab_size)
        if bad:
            raise ValueError(f"logit_bias token ids must be < vocab size {vocab_size}, got {bad[:5]}")
        bad = sorted(t for t in self.stop_token_ids if t >= vocab_size)
        if bad:
            raise ValueError(f"stop_token_ids must be < vocab size {vocab_size}, got {bad[:5]}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS
