"""Token sampling: request parameters, the per-sequence sampler, and stop-string detection.

Semantics follow Hugging Face ``generate`` and vLLM, in this order:

1. repetition penalty, HF style, over every token in prompt + output: positive logits are divided
   by the penalty, negative ones multiplied;
2. frequency and presence penalties, OpenAI style, over output tokens only:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``;
3. temperature (``temperature < 1e-5`` is greedy: argmax of the penalized logits, as in vLLM);
4. top-k (ties with the k-th value are kept), then top-p on the distribution renormalised after
   top-k (smallest top set whose mass reaches top_p; the most likely token always stays), then
   min-p (drop tokens whose probability is below ``min_p * max probability``). This is HF's and
   vLLM v0's order; vLLM v1 applies min-p before top-k/top-p, which differs only when min_p and
   top_p are both set (top-p then measures mass after the min-p cut).

Reported log-probabilities are vLLM's default (``logprobs_mode="raw_logprobs"``): the log-softmax
of the model's logits as given, before penalties, temperature and truncation. They describe what
the model predicted, not the distribution the token was drawn from.

Everything is numpy on one sequence's ``(vocab,)`` float32 row. Full-vocabulary sorts and
cumulative sums are avoided on the hot path: a full-vocab ``exp`` plus a sum costs ~0.1 ms at
vocab 49152 on the reference machine, a sort ~0.25 ms and a float64 cumsum ~0.3-0.6 ms, so the
draw walks 256-wide block sums and top-p first tries the tokens within ``log(1e4)`` of the max.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lmengine._core import kernels as _kernels
from lmengine.errors import InvalidRequestError, SamplingParamsError

__all__ = [
    "SamplingParams",
    "SampleResult",
    "Sampler",
    "StopChecker",
    "StopUpdate",
    "greedy",
    "MAX_LOGPROBS",
]

# Below this temperature sampling is greedy; vLLM's _SAMPLING_EPS.
_GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
# OpenAI's range for presence/frequency penalties, which vLLM enforces too.
_PENALTY_RANGE = 2.0
# Block width of the two-level cumulative-sum search; 49152 / 256 = 192 block sums.
_BLOCK = 256
# Top-p first looks only at tokens with weight >= this (weight = p / p_max); when they already
# hold top_p of the mass the nucleus lies inside them and the full-vocab sort is skipped.
_TOP_P_PROBE_WEIGHT = 1e-4


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name: str, value, requirement: str) -> SamplingParamsError:
    return SamplingParamsError(f"SamplingParams.{name} {requirement}, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. Invalid values raise ``SamplingParamsError``.

    ``temperature == 0`` is greedy. ``top_k`` 0 or -1 disables top-k. ``stop`` and
    ``stop_token_ids`` are normalised to lists. ``seed`` None draws from OS entropy; any int is
    accepted (negative seeds are folded modulo 2**64). ``logprobs`` n in [0, 20] asks for the n
    most likely tokens' log-probabilities at every step (0: only the sampled token's).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field and normalise types (ints, floats, lists); idempotent."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _fail("max_tokens", self.max_tokens, "must be an int >= 1")
        self.max_tokens = int(self.max_tokens)

        self.temperature = self._real("temperature", self.temperature)
        if self.temperature < 0:
            raise _fail("temperature", self.temperature, "must be >= 0 (0 means greedy)")

        if not _is_int(self.top_k) or self.top_k < -1:
            raise _fail("top_k", self.top_k, "must be an int >= -1 (0 or -1 disables it)")
        self.top_k = int(self.top_k)

        self.top_p = self._real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise _fail("top_p", self.top_p, "must be in (0, 1]")

        self.min_p = self._real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise _fail("min_p", self.min_p, "must be in [0, 1]")

        self.repetition_penalty = self._real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise _fail("repetition_penalty", self.repetition_penalty, "must be > 0")

        for name in ("presence_penalty", "frequency_penalty"):
            value = self._real(name, getattr(self, name))
            if not -_PENALTY_RANGE <= value <= _PENALTY_RANGE:
                raise _fail(name, value, f"must be in [-{_PENALTY_RANGE}, {_PENALTY_RANGE}]")
            setattr(self, name, value)

        if self.seed is not None:
            if not _is_int(self.seed):
                raise _fail("seed", self.seed, "must be an int or None")
            self.seed = int(self.seed)

        self.stop = self._stop_strings(self.stop)
        self.stop_token_ids = self._token_ids(self.stop_token_ids)

        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _fail(name, getattr(self, name), "must be a bool")
            setattr(self, name, bool(getattr(self, name)))

        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise _fail(
                    "logprobs", self.logprobs, f"must be None or an int in [0, {MAX_LOGPROBS}]"
                )
            self.logprobs = int(self.logprobs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE

    @staticmethod
    def _real(name: str, value) -> float:
        if not _is_real(value) or not math.isfinite(value):
            raise _fail(name, value, "must be a finite real number")
        return float(value)

    @staticmethod
    def _stop_strings(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise _fail("stop", stop, "must be a str, a list of str, or None")
        for item in stop:
            if not isinstance(item, str) or not item:
                raise _fail("stop", stop, "must hold only non-empty strings")
        return list(stop)

    @staticmethod
    def _token_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise _fail("stop_token_ids", ids, "must be a list of int or None")
        for item in ids:
            if not _is_int(item) or item < 0:
                raise _fail("stop_token_ids", ids, "must hold only ints >= 0")
        return [int(item) for item in ids]


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


class SampleResult(NamedTuple):
    """One sampled token. ``logprob`` and ``top_logprobs`` are raw log-softmax values of the
    model's logits; ``top_logprobs`` is None unless logprobs were requested, else the n most
    likely ``(token_id, logprob)`` pairs, most likely first."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None


def greedy(logits_2d: np.ndarray) -> np.ndarray:
    """Argmax of each row: ``(batch, vocab)`` logits -> ``(batch,)`` int64 token ids.

    For batches whose sequences need nothing else (greedy, no penalties, no logprobs; see
    ``Sampler.is_plain_greedy``); report the chosen ids back with ``Sampler.record``.
    """
    logits_2d = np.asarray(logits_2d)
    if logits_2d.ndim != 2 or logits_2d.shape[1] == 0:
        raise ValueError(f"greedy: expected (batch, vocab) logits, got shape {logits_2d.shape}")
    return np.argmax(logits_2d, axis=1).astype(np.int64, copy=False)


class _IdList:
    """Append-only int64 array with amortised O(1) append and a zero-copy view."""

    def __init__(self, initial: np.ndarray) -> None:
        self._buffer = np.empty(max(64, 2 * initial.size), dtype=np.int64)
        self._buffer[: initial.size] = initial
        self._size = initial.size

    def append(self, value: int) -> None:
        if self._size == self._buffer.size:
            self._buffer = np.concatenate([self._buffer, np.empty_like(self._buffer)])
        self._buffer[self._size] = value
        self._size += 1

    def view(self) -> np.ndarray:
        return self._buffer[: self._size]


def _search_cumsum(
    values: np.ndarray, fraction: float, side: str, total: float | None = None
) -> int:
    """First index i where ``cumsum(values)[i]`` exceeds (side="right") or reaches (side="left")
    ``fraction * total``, ``total`` defaulting to ``values.sum()``; ``values.size`` if it never
    gets there.

    Two levels (256-wide block sums, then one block's cumsum) so a full-vocab row costs one
    pass of summation instead of a float64 cumsum over the whole vocabulary.
    """
    size = values.size
    if size <= 4 * _BLOCK:
        cumulative = values.cumsum(dtype=np.float64)
        target = fraction * (float(cumulative[-1]) if total is None else total)
        return int(cumulative.searchsorted(target, side))
    full_blocks = size // _BLOCK
    block_sums = np.empty(full_blocks + 1, dtype=np.float64)
    # float32 partial sums of 256 values (pairwise, ~1e-7 relative error) are plenty for
    # sampling and twice as fast as casting every value to float64.
    block_sums[:full_blocks] = (
        values[: full_blocks * _BLOCK].reshape(full_blocks, _BLOCK).sum(axis=1)
    )
    block_sums[full_blocks] = values[full_blocks * _BLOCK :].sum(dtype=np.float64)
    block_cumulative = block_sums.cumsum()
    target = fraction * (float(block_cumulative[-1]) if total is None else total)
    block = int(block_cumulative.searchsorted(target, side))
    if block > full_blocks:
        return size
    before = float(block_cumulative[block - 1]) if block else 0.0
    start = block * _BLOCK
    block_values = values[start : start + _BLOCK]
    inside = block_values.cumsum(dtype=np.float64)
    offset = int(inside.searchsorted(target - before, side))
    if offset == inside.size:
        # Rounding between the block total and the in-block cumsum pushed the target past the
        # block's end; the answer is the block's last nonzero value.
        nonzero = np.flatnonzero(block_values)
        offset = int(nonzero[-1]) if nonzero.size else inside.size - 1
    return start + offset


def _draw(weights: np.ndarray, uniform: float) -> int:
    """Inverse-CDF draw from unnormalised non-negative ``weights`` with ``uniform`` in [0, 1).
    Never returns an index of weight 0."""
    index = _search_cumsum(weights, uniform, "right")
    if index >= weights.size or weights[index] <= 0:
        # Only reachable through rounding at the very top of the CDF.
        index = int(np.flatnonzero(weights > 0)[-1])
    return index


def _top_p_probe(weights: np.ndarray, target: float) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens of weight >= 1e-4 (relative to the max) with their weights, when they hold at
    least ``target`` of the mass: the nucleus then lies inside them, and sorting them replaces
    a full-vocabulary sort. Otherwise ``(None, weights)`` unchanged."""
    probe_mask = weights >= np.float32(_TOP_P_PROBE_WEIGHT)
    if np.count_nonzero(probe_mask) < weights.size // 4:
        probe = np.flatnonzero(probe_mask)
        probe_weights = weights[probe]
        if probe_weights.sum(dtype=np.float64) >= target:
            return probe, probe_weights
    return None, weights


class _Truncated(NamedTuple):
    """A truncated distribution: ``weights[i] = exp((logit - max) / T)`` of candidate token
    ``ids[i]`` (``ids`` None: the whole vocabulary), kept iff ``weights[i] >= threshold``.
    ``descending`` is ``weights`` sorted descending when top-p had to sort them."""

    ids: np.ndarray | None
    weights: np.ndarray
    threshold: float
    descending: np.ndarray | None

    def draw(self, uniform: float) -> int:
        """Token id for ``uniform`` in [0, 1), by inverse CDF over the kept weights."""
        weights, threshold = self.weights, self.threshold
        if self.descending is not None:
            index = self._draw_sorted(uniform)
        elif threshold > 0:
            kept = np.flatnonzero(weights >= threshold)
            index = int(kept[_draw(weights[kept], uniform)])
        else:
            index = _draw(weights, uniform)
        return index if self.ids is None else int(self.ids[index])

    def _draw_sorted(self, uniform: float) -> int:
        # The kept weights are a prefix of `descending`; draw a position there and map it back
        # to a token: the r-th position among equal values is the r-th token with that weight.
        descending = self.descending
        ascending = descending[::-1]
        # float32 keys: a Python float would make searchsorted cast the whole array to float64.
        kept = descending.size - int(ascending.searchsorted(np.float32(self.threshold), "left"))
        position = min(_search_cumsum(descending[:kept], uniform, "right"), kept - 1)
        value = descending[position]
        if value <= 0:
            # Only reachable through rounding at the very top of the CDF.
            position = descending.size - int(ascending.searchsorted(np.float32(0), "right")) - 1
            value = descending[position]
        first_equal = descending.size - int(ascending.searchsorted(value, "right"))
        return int(np.flatnonzero(self.weights == value)[position - first_equal])


class Sampler:
    """Samples one sequence's tokens; keeps its generated ids for the penalties.

    ``sample(logits)`` draws a token from a ``(vocab,)`` row and records it. Tokens chosen
    elsewhere (batched ``greedy``, forced tokens) are reported with ``record`` so the
    penalties see them. Randomness comes from a private ``np.random.Generator`` seeded from
    ``params.seed``: one uniform per non-greedy draw, so equal seeds give equal outputs.
    """

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int] | np.ndarray):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Sampler: params must be SamplingParams, got {type(params).__name__}")
        prompt = np.asarray(prompt_token_ids)
        if prompt.ndim != 1 or (prompt.size and not np.issubdtype(prompt.dtype, np.integer)):
            raise InvalidRequestError("Sampler: prompt_token_ids must be a 1-D sequence of ints")
        self.params = params
        self.output_token_ids: list[int] = []
        self._prompt_ids = prompt.astype(np.int64)
        seed = None if params.seed is None else params.seed % 2**64
        self._rng = np.random.default_rng(seed)
        self._uses_repetition = params.repetition_penalty != 1.0
        self._uses_output_penalties = params.frequency_penalty != 0 or params.presence_penalty != 0
        # Penalty state is sized by the vocabulary, which the first logits row reveals.
        self._vocab_size: int | None = None
        self._seen_mask: np.ndarray | None = None  # (vocab,) bool: in prompt or output
        self._seen_ids: _IdList | None = None
        self._output_counts: np.ndarray | None = None  # (vocab,) float32 occurrence counts
        self._output_unique: _IdList | None = None

    @property
    def uses_penalties(self) -> bool:
        return self._uses_repetition or self._uses_output_penalties

    @property
    def is_plain_greedy(self) -> bool:
        """True when a batched argmax (``greedy``) picks exactly what ``sample`` would."""
        return self.params.is_greedy and not self.uses_penalties and self.params.logprobs is None

    def record(self, token_id: int) -> None:
        """Append a generated token chosen outside ``sample``."""
        token_id = int(token_id)
        self.output_token_ids.append(token_id)
        if self._vocab_size is None:
            return
        if not 0 <= token_id < self._vocab_size:
            raise InvalidRequestError(
                f"Sampler.record: token id {token_id} outside vocab of {self._vocab_size}"
            )
        if self._uses_repetition and not self._seen_mask[token_id]:
            self._seen_mask[token_id] = True
            self._seen_ids.append(token_id)
        if self._uses_output_penalties:
            if self._output_counts[token_id] == 0:
                self._output_unique.append(token_id)
            self._output_counts[token_id] += 1

    def sample(self, logits: np.ndarray) -> SampleResult:
        """Draw the next token from one ``(vocab,)`` logits row (not modified) and record it."""
        raw, raw_max, raw_log_total = self._check_logits(logits)
        penalized = self._penalized(raw)

        if self.params.is_greedy:
            token_id = int(np.argmax(penalized))
        else:
            reuse = None
            if penalized is raw and self.params.temperature == 1.0:
                # At temperature 1 without penalties the sampling weights are exp(raw - max).
                reuse = np.subtract(raw, np.float32(raw_max))
                np.exp(reuse, out=reuse)
            token_id = self._truncate(penalized, reuse).draw(self._rng.random())

        top = None
        if self.params.logprobs is not None:
            top = self._top_logprobs(raw, raw_log_total, self.params.logprobs)
        self.record(token_id)
        return SampleResult(token_id, float(raw[token_id]) - raw_log_total, top)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distribution ``sample`` would draw from, as ``(token_ids, probs)`` over the tokens
        of nonzero probability, ascending ids (probs float64, summing to 1). Records nothing."""
        penalized = self._penalized(self._check_logits(logits)[0])
        if self.params.is_greedy:
            return np.array([int(np.argmax(penalized))], dtype=np.int64), np.ones(1)
        truncated = self._truncate(penalized, None)
        weights = truncated.weights
        ids = np.arange(weights.size) if truncated.ids is None else truncated.ids
        keep = (weights >= truncated.threshold) & (weights > 0)
        probs = weights[keep].astype(np.float64)
        return ids[keep].astype(np.int64, copy=False), probs / probs.sum()

    # -- internals -----------------------------------------------------------------------------

    def _check_logits(self, logits: np.ndarray) -> tuple[np.ndarray, float, float]:
        """``logits`` as a contiguous float32 row, its max and its log-sum-exp."""
        raw = np.ascontiguousarray(logits, dtype=np.float32)
        if raw.ndim != 1 or raw.size == 0:
            raise ValueError(f"Sampler: expected (vocab,) logits, got shape {raw.shape}")
        if self._vocab_size is None:
            self._init_vocab(raw.size)
        elif raw.size != self._vocab_size:
            raise ValueError(f"Sampler: vocab changed from {self._vocab_size} to {raw.size}")
        # One pass in the core (vectorised exp, double sum); the max is NaN if any logit is, so
        # one test catches NaN, +inf and an all -inf row.
        peak, log_total = _kernels.log_sum_exp(raw)
        if not math.isfinite(peak):
            raise ValueError(f"Sampler: logits row is not usable (max = {peak})")
        return raw, peak, log_total

    def _init_vocab(self, vocab_size: int) -> None:
        self._vocab_size = vocab_size
        if not self.uses_penalties:
            return
        history = np.concatenate(
            [self._prompt_ids, np.asarray(self.output_token_ids, dtype=np.int64)]
        )
        if history.size and (history.min() < 0 or history.max() >= vocab_size):
            raise InvalidRequestError(
                f"Sampler: token ids must be in [0, {vocab_size}) for the penalties"
            )
        if self._uses_repetition:
            self._seen_mask = np.zeros(vocab_size, dtype=bool)
            self._seen_mask[history] = True
            self._seen_ids = _IdList(np.flatnonzero(self._seen_mask))
        if self._uses_output_penalties:
            outputs = np.asarray(self.output_token_ids, dtype=np.int64)
            self._output_counts = np.bincount(outputs, minlength=vocab_size).astype(np.float32)
            self._output_unique = _IdList(np.flatnonzero(self._output_counts))

    def _penalized(self, raw: np.ndarray) -> np.ndarray:
        """Logits after the penalties; ``raw`` itself when none applies (never modified)."""
        params = self.params
        repeated = self._seen_ids.view() if self._uses_repetition else None
        produced = self._output_unique.view() if self._uses_output_penalties else None
        if (repeated is None or not repeated.size) and (produced is None or not produced.size):
            return raw
        logits = raw.copy()
        if repeated is not None and repeated.size:
            values = logits[repeated]
            penalty = np.float32(params.repetition_penalty)
            logits[repeated] = np.where(values > 0, values / penalty, values * penalty)
        if produced is not None and produced.size:
            # Two float32 subtractions in vLLM's order, so results match it bit for bit.
            counts = self._output_counts[produced]
            values = logits[produced]
            values -= np.float32(params.frequency_penalty) * counts
            values -= np.float32(params.presence_penalty)
            logits[produced] = values
        return logits

    def _truncate(
        self, logits: np.ndarray, exp_at_unit_temperature: np.ndarray | None
    ) -> _Truncated:
        """Temperature, top-k, top-p and min-p applied to penalized ``logits``."""
        params = self.params
        vocab = logits.size
        peak = logits.max()
        ids = None
        if 0 < params.top_k < vocab:
            kth = np.partition(logits, vocab - params.top_k)[vocab - params.top_k]
            ids = np.flatnonzero(logits >= kth)  # ties with the k-th value stay, as in vLLM
            weights = np.subtract(logits[ids], peak)
        elif exp_at_unit_temperature is not None:
            weights = exp_at_unit_temperature
        else:
            weights = np.subtract(logits, peak)
        if weights is not exp_at_unit_temperature:
            weights /= np.float32(params.temperature)
            np.exp(weights, out=weights)

        # min-p compares p / p_max, which is the weight itself and survives renormalisation, so
        # applying it as a threshold after top-p is the same as vLLM's mask on the new probs.
        threshold = np.float32(params.min_p)
        descending = None
        if params.top_p < 1.0:
            total = float(weights.sum(dtype=np.float64))
            if ids is None:
                ids, weights = _top_p_probe(weights, params.top_p * total)
            descending = np.sort(weights)[::-1]
            last_kept = _search_cumsum(descending, params.top_p, "left", total)
            # Token i stays iff the mass strictly more likely than it is below top_p (the
            # HF / vLLM rule); ties with the last kept weight stay too.
            threshold = max(threshold, descending[min(last_kept, descending.size - 1)])
        return _Truncated(ids, weights, float(threshold), descending)

    @staticmethod
    def _top_logprobs(raw: np.ndarray, log_total: float, count: int) -> list[tuple[int, float]]:
        if count == 0:
            return []
        count = min(count, raw.size)
        top = np.argpartition(raw, raw.size - count)[raw.size - count :]
        top = top[np.argsort(-raw[top], kind="stable")]
        return [(int(i), float(raw[i]) - log_total) for i in top]


# --------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------


class StopUpdate(NamedTuple):
    """What one ``StopChecker.append`` decided: ``text`` is safe to stream now; ``stopped``
    says a stop string completed (``stop_str``), after which the sequence is finished."""

    text: str
    stopped: bool
    stop_str: str | None


class StopChecker:
    """Incremental stop-string detection over detokenized text pieces.

    Feed each new piece with ``append``; it returns the text now safe to stream. A match may
    straddle any number of earlier pieces. When several stop strings occur, the one starting
    earliest wins (the shorter one on a tie, as it completes first). The output is cut before
    the stop string, or after it with ``include_stop_str_in_output``. Text that could still
    become the start of a stop string is held back until decided; call ``finish`` when the
    sequence ends for another reason (EOS, max_tokens) to release it.

    Invariant: no stop string starts inside already-emitted text, because every suffix that is
    a prefix of a stop string is held back (when the stop string is excluded from the output).
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise SamplingParamsError(f"StopChecker: stop strings must be non-empty, got {stop!r}")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._longest = max((len(s) for s in self.stop), default=0)
        self._text = ""
        self._emitted = 0
        self._stop_str: str | None = None
        self._finished = False

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopChecker:
        return cls(params.stop, params.include_stop_str_in_output)

    @property
    def text(self) -> str:
        """All text so far; after a stop, the final output (cut at the stop string)."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self._stop_str is not None

    @property
    def stop_str(self) -> str | None:
        return self._stop_str

    @property
    def held_back(self) -> str:
        """Accepted text not yet emitted, waiting to see whether a stop string completes."""
        return self._text[self._emitted :]

    def append(self, piece: str) -> StopUpdate:
        """Add the next detokenized piece; returns the newly emittable text."""
        if self._finished:
            raise RuntimeError("StopChecker.append after the sequence finished")
        # A new match must end inside `piece`, so it starts at most len(stop) - 1 chars earlier
        # (possibly inside emitted text when the stop string is part of the output).
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += piece
        match = self.find(self._text, search_from)
        if match is not None:
            start, stop_str = match
            end = start + len(stop_str) if self.include_stop_str_in_output else start
            self._text = self._text[:end]
            self._stop_str = stop_str
            self._finished = True
            return StopUpdate(self._release(end), True, stop_str)
        hold = 0 if self.include_stop_str_in_output else self.partial_match_length(self._text)
        return StopUpdate(self._release(len(self._text) - hold), False, None)

    def finish(self) -> str:
        """End of sequence without a stop string: release and return the held-back text."""
        self._finished = True
        return self._release(len(self._text))

    def find(self, text: str, start: int = 0) -> tuple[int, str] | None:
        """Earliest ``(position, stop_str)`` in ``text[start:]``, or None."""
        best: tuple[int, int, str] | None = None
        for stop_str in self.stop:
            position = text.find(stop_str, start)
            if position >= 0 and (best is None or (position, len(stop_str)) < best[:2]):
                best = (position, len(stop_str), stop_str)
        return None if best is None else (best[0], best[2])

    def partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop_str in self.stop:
            for length in range(min(len(stop_str) - 1, len(text)), longest, -1):
                if text.endswith(stop_str[:length]):
                    longest = length
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self._emitted)
        released = self._text[self._emitted : end]
        self._emitted = end
        return released


def end_of_request(
    token: int,
    params: SamplingParams,
    eos_token_ids: Collection[int],
    stops: StopChecker,
    detok,
    n_output: int,
    max_new: int,
) -> tuple[str | None, str, str | int | None]:
    """After sampling ``token`` (the ``n_output``-th): (finish reason or None, text to emit,
    stop reason). Rules, in order: EOS (unless ignore_eos) or a stop token id; a stop string
    completed by the new text; ``max_new`` reached. ``detok`` is the request's incremental
    detokenizer; text it still holds is released at the end."""
    if (not params.ignore_eos and token in eos_token_ids) or token in (params.stop_token_ids or ()):
        tail = stops.append(detok.flush())
        if tail.stopped:
            return "stop", tail.text, tail.stop_str
        return "stop", tail.text + stops.finish(), token
    update = stops.append(detok.add(token))
    if update.stopped:
        return "stop", update.text, update.stop_str
    if n_output < max_new:
        return None, update.text, None
    tail = stops.append(detok.flush())
    if tail.stopped:
        return "stop", update.text + tail.text, tail.stop_str
    return "length", update.text + tail.text + stops.finish(), None
