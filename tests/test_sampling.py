"""Sampling: SamplingParams validation, Sampler against plain references, StopChecker.

References, at the top of the file: a float64 numpy pipeline that follows vLLM's code line by line
(penalties, temperature, ``apply_top_k_top_p``, min-p), and Hugging Face's logits processors,
which implement the same rules. Sampled frequencies are checked with a chi-square test at a fixed
seed, so every test is deterministic.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from lmengine.errors import InvalidRequestError, SamplingParamsError
from lmengine.sampling import (
    MAX_LOGPROBS,
    Sampler,
    SampleResult,
    SamplingParams,
    StopChecker,
    _search_cumsum,
    greedy,
)

# ---------------------------------------------------------------------------------------------
# Tolerances. The sampler works in float32 (as vLLM does) and the reference in float64.
#   * probabilities: float32 exp/renormalise, relative error a few ulp -> PROB_RTOL, plus
#     PROB_ATOL for probabilities that underflow differently;
#   * log-probabilities: one float32 log-sum-exp over <= 50k terms -> LOGPROB_ATOL;
#   * truncation boundaries are ambiguous in float32 when a token's cumulative mass is within
#     TOP_P_MARGIN of top_p (float32 weights summed over <= 50k terms: ~1e-6 absolute) or its
#     p / p_max is within MIN_P_MARGIN of min_p; such tokens are left out of the comparison
#     (ambiguous_tokens), or the logits are redrawn where a test needs none (unambiguous_logits).
#   * chi-square: reject at the 1 - 1e-5 quantile (Wilson-Hilferty), CHI2_Z standard deviations.
PROB_RTOL = 2e-5
PROB_ATOL = 1e-9
LOGPROB_ATOL = 2e-5
TOP_P_MARGIN = 3e-6
MIN_P_MARGIN = 1e-5
CHI2_Z = 4.3
# ---------------------------------------------------------------------------------------------

VOCAB_SIZES = [1, 2, 7, 255, 256, 257, 1023, 1025, 5003, 49152]


def random_logits(rng: np.random.Generator, vocab: int, scale: float = 3.0) -> np.ndarray:
    """Random float32 logits with a nonzero mean, never all equal."""
    return (rng.standard_normal(vocab) * scale + rng.uniform(-5, 5)).astype(np.float32)


def reference_penalized(logits, prompt_ids, output_ids, params: SamplingParams) -> np.ndarray:
    """vLLM's apply_penalties in float64: repetition over prompt + output, then frequency and
    presence over output counts."""
    out = logits.astype(np.float64).copy()
    for token in set(prompt_ids) | set(output_ids):
        value = out[token]
        out[token] = (
            value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        )
    for token, count in Counter(output_ids).items():
        out[token] -= params.frequency_penalty * count + params.presence_penalty
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_probs(logits, params: SamplingParams, prompt_ids=(), output_ids=()) -> np.ndarray:
    """The distribution vLLM samples from, (vocab,) float64: vLLM's code, line by line."""
    logits = reference_penalized(logits, prompt_ids, output_ids, params)
    if params.is_greedy:
        probs = np.zeros(logits.size)
        probs[np.argmax(logits)] = 1.0
        return probs
    logits = logits / params.temperature
    order = np.argsort(logits, kind="stable")  # ascending, as apply_top_k_top_p
    logits_sort = logits[order]
    if 0 < params.top_k < logits.size:
        kth = logits_sort[logits.size - params.top_k]
        logits_sort = np.where(logits_sort < kth, -np.inf, logits_sort)
    if params.top_p < 1.0:
        cumulative = np.cumsum(softmax(logits_sort))
        remove = cumulative <= 1 - params.top_p
        remove[-1] = False
        logits_sort = np.where(remove, -np.inf, logits_sort)
    logits = np.empty_like(logits)
    logits[order] = logits_sort
    if params.min_p > 0:
        probs = softmax(logits)
        logits = np.where(probs < params.min_p * probs.max(), -np.inf, logits)
    return softmax(logits)


def ambiguous_tokens(logits, params: SamplingParams) -> np.ndarray:
    """(vocab,) bool: tokens whose top-p or min-p decision lies within the margins of the cut,
    where float32 may legitimately disagree with float64."""
    scaled = logits.astype(np.float64) / max(params.temperature, 1e-5)
    if 0 < params.top_k < scaled.size:
        kth = np.sort(scaled)[scaled.size - params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = softmax(scaled)
    order = np.argsort(-probs, kind="stable")
    above = np.empty_like(probs)
    above[order] = np.cumsum(probs[order]) - probs[order]
    ambiguous = np.zeros(probs.size, dtype=bool)
    if params.top_p < 1:
        ambiguous |= (np.abs(above - params.top_p) < TOP_P_MARGIN) & (probs > 0)
    if params.min_p > 0:
        ambiguous |= np.abs(probs / probs.max() - params.min_p) < MIN_P_MARGIN
    return ambiguous


def unambiguous_logits(rng, vocab: int, params: SamplingParams, scale: float = 3.0) -> np.ndarray:
    for _ in range(100):
        logits = random_logits(rng, vocab, scale)
        if not ambiguous_tokens(logits, params).any():
            return logits
    raise AssertionError("could not draw unambiguous logits")


def assert_same_distribution(got: np.ndarray, expected: np.ndarray, ambiguous: np.ndarray) -> None:
    """Equal support and probabilities, except on ambiguous tokens; their mass (tiny) may move
    between the two, which rescales the others by as much."""
    clear = ~ambiguous
    np.testing.assert_array_equal(
        np.flatnonzero((got > 0) & clear), np.flatnonzero((expected > 0) & clear)
    )
    slack = got[ambiguous].sum() + expected[ambiguous].sum()
    np.testing.assert_allclose(got[clear], expected[clear], rtol=PROB_RTOL + slack, atol=PROB_ATOL)


def chi_square_critical(dof: int) -> float:
    """Upper quantile of chi-square(dof) at CHI2_Z standard normal deviations (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + CHI2_Z * math.sqrt(a)) ** 3


def assert_samples_follow(samples: np.ndarray, probs: np.ndarray) -> None:
    """Chi-square goodness of fit; categories expecting < 5 draws are pooled into one."""
    n = samples.size
    observed = np.bincount(samples, minlength=probs.size).astype(np.float64)
    assert observed[probs == 0].sum() == 0, "sampled a token of probability 0"
    expected = probs * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    dof = obs.size - 1
    if dof == 0:
        return
    statistic = float(((obs - exp) ** 2 / exp).sum())
    assert statistic < chi_square_critical(dof), f"chi2 = {statistic:.1f} with {dof} dof"


def draw_many(params: SamplingParams, logits: np.ndarray, count: int) -> np.ndarray:
    sampler = Sampler(params, [])
    return np.array([sampler.sample(logits).token_id for _ in range(count)])


def support_and_probs(sampler: Sampler, logits) -> np.ndarray:
    """Sampler.distribution scattered into a (vocab,) array."""
    ids, probs = sampler.distribution(logits)
    full = np.zeros(logits.size)
    full[ids] = probs
    return full


# ---------------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------------

INVALID_PARAMS = [
    ("max_tokens", -1),
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("max_tokens", "3"),
    ("max_tokens", True),
    ("max_tokens", None),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", "1"),
    ("temperature", None),
    ("temperature", True),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", "5"),
    ("top_k", None),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.01),
    ("top_p", float("nan")),
    ("top_p", "0.9"),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", float("nan")),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")),
    ("repetition_penalty", float("inf")),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", float("nan")),
    ("frequency_penalty", 3),
    ("frequency_penalty", float("-inf")),
    ("seed", 1.5),
    ("seed", "1"),
    ("seed", True),
    ("stop", 5),
    ("stop", [""]),
    ("stop", ""),
    ("stop", ["a", 3]),
    ("stop", [None]),
    ("stop_token_ids", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", "12"),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("ignore_eos", None),
    ("include_stop_str_in_output", 0),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", 1.5),
    ("logprobs", True),
]


@pytest.mark.parametrize("field,value", INVALID_PARAMS)
def test_invalid_params_raise(field, value):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field,value", INVALID_PARAMS[:6])
def test_validate_catches_later_mutation(field, value):
    params = SamplingParams()
    setattr(params, field, value)
    with pytest.raises(SamplingParamsError, match=field):
        params.validate()


def test_params_are_normalised():
    params = SamplingParams(
        temperature=1, top_k=np.int64(5), top_p=np.float32(0.5), stop="x", seed=np.int32(3)
    )
    assert params.temperature == 1.0 and type(params.temperature) is float
    assert params.top_k == 5 and type(params.top_k) is int
    assert type(params.top_p) is float and type(params.seed) is int
    assert params.stop == ["x"] and params.stop_token_ids == []
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(1, 2)).stop == ["a", "b"]
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams().is_greedy
    for valid in (
        dict(top_k=-1),
        dict(top_p=1.0),
        dict(min_p=1.0),
        dict(logprobs=0),
        dict(logprobs=MAX_LOGPROBS),
        dict(seed=-7),
        dict(presence_penalty=-2.0),
    ):
        SamplingParams(**valid)


def test_errors_are_catchable_as_value_error():
    with pytest.raises(ValueError):
        SamplingParams(top_p=2.0)
    assert issubclass(SamplingParamsError, InvalidRequestError)


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", VOCAB_SIZES)
def test_greedy_is_argmax(vocab):
    rng = np.random.default_rng(vocab)
    sampler = Sampler(SamplingParams(temperature=0.0), [])
    for _ in range(5):
        logits = random_logits(rng, vocab)
        assert sampler.sample(logits).token_id == int(np.argmax(logits))
    assert len(sampler.output_token_ids) == 5


def test_tiny_temperature_is_greedy():
    rng = np.random.default_rng(0)
    logits = random_logits(rng, 1000)
    params = SamplingParams(temperature=1e-6, seed=0)
    assert set(draw_many(params, logits, 20)) == {int(np.argmax(logits))}


@pytest.mark.parametrize("batch,vocab", [(1, 1), (1, 7), (5, 257), (3, 49152)])
def test_batched_greedy(batch, vocab):
    logits = np.random.default_rng(batch).standard_normal((batch, vocab)).astype(np.float32)
    ids = greedy(logits)
    assert ids.dtype == np.int64 and ids.shape == (batch,)
    np.testing.assert_array_equal(ids, logits.argmax(axis=1))
    with pytest.raises(ValueError):
        greedy(logits[0])


@pytest.mark.parametrize("vocab", [7, 1025, 49152])
@pytest.mark.parametrize(
    "greedy_like",
    [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, top_p=0.5, min_p=0.3)],
)
def test_truncation_to_one_token_is_greedy(vocab, greedy_like):
    rng = np.random.default_rng(vocab)
    logits = random_logits(rng, vocab)
    samples = draw_many(SamplingParams(temperature=1.3, seed=1, **greedy_like), logits, 30)
    assert set(samples) == {int(np.argmax(logits))}


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------

SEED_CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=0.7, top_p=0.999),
    dict(temperature=1.2, top_k=40, min_p=0.01),
    dict(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
]


@pytest.mark.parametrize("config", SEED_CONFIGS)
def test_same_seed_same_tokens(config):
    rng = np.random.default_rng(11)
    rows = [random_logits(rng, 5003, scale=1.0) for _ in range(40)]
    prompt = list(rng.integers(0, 5003, 30))

    def run(seed):
        sampler = Sampler(SamplingParams(seed=seed, **config), prompt)
        return [sampler.sample(row).token_id for row in rows]

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)
    assert run(-5) == run(-5)
    # Unseeded samplers draw from OS entropy; 40 draws over ~5000 tokens never coincide.
    assert run(None) != run(None)


# ---------------------------------------------------------------------------------------------
# Distributions against the reference
# ---------------------------------------------------------------------------------------------

TRUNCATION_CONFIGS = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.7),
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=300, temperature=0.8),
    dict(top_p=0.5),
    dict(top_p=0.9, temperature=0.7),
    dict(top_p=0.97, temperature=1.5),
    dict(top_p=0.999),
    dict(min_p=0.05),
    dict(min_p=0.3, temperature=2.0),
    dict(top_k=50, top_p=0.8),
    dict(top_k=20, top_p=0.9, min_p=0.1, temperature=0.9),
    dict(top_p=0.95, min_p=0.02, temperature=1.1),
    dict(top_k=-1, top_p=0.7),
]


@pytest.mark.parametrize("vocab", VOCAB_SIZES)
@pytest.mark.parametrize("config", TRUNCATION_CONFIGS)
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_distribution_matches_reference(vocab, config, scale):
    """Support and probabilities of Sampler.distribution equal vLLM's. scale 0.3 makes a flat
    distribution (top-p sorts the whole vocabulary), 3.0 a peaked one (top-p takes the probe)."""
    params = SamplingParams(**config)
    logits = random_logits(np.random.default_rng(vocab * 31 + int(scale * 10)), vocab, scale)
    expected = reference_probs(logits, params)
    got = support_and_probs(Sampler(params, []), logits)
    assert_same_distribution(got, expected, ambiguous_tokens(logits, params))


@pytest.mark.parametrize("vocab", [257, 5003])
@pytest.mark.parametrize("config", TRUNCATION_CONFIGS)
def test_distribution_matches_transformers(vocab, config):
    """The same support as Hugging Face's warper chain (temperature, top-k, top-p, min-p)."""
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    params = SamplingParams(**config)
    logits = random_logits(np.random.default_rng(vocab + 7), vocab)
    warpers = [generation.TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(generation.TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(generation.TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(generation.MinPLogitsWarper(params.min_p))
    scores = torch.from_numpy(logits)[None].clone()
    input_ids = torch.zeros((1, 1), dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    expected = torch.softmax(scores.double(), dim=-1)[0].numpy()
    got = support_and_probs(Sampler(params, []), logits)
    assert_same_distribution(got, expected, ambiguous_tokens(logits, params))


def test_top_k_keeps_ties_with_kth_value():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 2.0, -1.0], dtype=np.float32)
    ids, _ = Sampler(SamplingParams(top_k=2), []).distribution(logits)
    np.testing.assert_array_equal(ids, [0, 2, 3, 4])


@pytest.mark.parametrize(
    "vocab,config,scale,draws",
    [
        (11, dict(temperature=0.7), 2.0, 20_000),
        (11, dict(temperature=1.9), 2.0, 20_000),
        (3001, dict(temperature=1.0), 1.5, 20_000),  # two-level CDF walk
        (3001, dict(temperature=0.8, top_p=0.9), 0.5, 20_000),  # full sort, sorted-prefix draw
        (3001, dict(temperature=0.8, top_p=0.9), 3.0, 20_000),  # top-p probe
        (1500, dict(top_k=30, min_p=0.05), 2.0, 20_000),
        (700, dict(min_p=0.2), 1.0, 20_000),
    ],
)
def test_sampled_frequencies_follow_distribution(vocab, config, scale, draws):
    params = SamplingParams(seed=2024, **config)
    logits = unambiguous_logits(np.random.default_rng(vocab), vocab, params, scale)
    assert_samples_follow(draw_many(params, logits, draws), reference_probs(logits, params))


def test_sampled_frequencies_with_tied_logits():
    """Heavy ties through the sorted-prefix draw: every tied token must be reachable, uniformly,
    and the top-p cut keeps the whole tie class at the boundary."""
    vocab = 1500
    rng = np.random.default_rng(5)
    logits = (rng.integers(0, 4, vocab) * 0.5).astype(np.float32)
    params = SamplingParams(top_p=0.8, seed=99)
    weights = np.exp(logits.astype(np.float64) - logits.max())
    descending = np.sort(weights)[::-1]
    above = np.cumsum(descending) - descending
    cut = descending[np.flatnonzero(above < 0.8 * weights.sum())[-1]]
    expected = np.where(weights >= cut, weights, 0.0)
    expected /= expected.sum()
    np.testing.assert_allclose(support_and_probs(Sampler(params, []), logits), expected, rtol=1e-6)
    assert_samples_follow(draw_many(params, logits, 30_000), expected)


# ---------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------

PENALTY_CONFIGS = [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(frequency_penalty=0.8),
    dict(presence_penalty=-1.5),
    dict(repetition_penalty=1.2, frequency_penalty=0.4, presence_penalty=0.6),
]


@pytest.mark.parametrize("vocab", [2, 257, 5003, 49152])
@pytest.mark.parametrize("config", PENALTY_CONFIGS)
def test_penalties_match_reference(vocab, config):
    rng = np.random.default_rng(vocab)
    logits = random_logits(rng, vocab)
    prompt = list(rng.integers(0, vocab, 20))
    outputs = list(rng.integers(0, vocab, 25)) + list(prompt[:3]) * 2  # repeats and overlaps
    params = SamplingParams(**config)
    sampler = Sampler(params, prompt)
    for token in outputs:
        sampler.record(token)
    expected = reference_probs(logits, params, prompt, outputs)
    np.testing.assert_allclose(support_and_probs(sampler, logits), expected, rtol=1e-4, atol=1e-9)
    greedy_sampler = Sampler(SamplingParams(temperature=0, **config), prompt)
    for token in outputs:
        greedy_sampler.record(token)
    penalized = reference_penalized(logits, prompt, outputs, params)
    assert greedy_sampler.sample(logits).token_id == int(np.argmax(penalized))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    vocab = 1025
    rng = np.random.default_rng(3)
    logits = random_logits(rng, vocab)
    prompt = list(rng.integers(0, vocab, 40))
    outputs = list(rng.integers(0, vocab, 10))
    sampler = Sampler(SamplingParams(repetition_penalty=penalty), prompt)
    for token in outputs:
        sampler.record(token)
    processor = generation.RepetitionPenaltyLogitsProcessor(penalty)
    input_ids = torch.tensor([prompt + outputs], dtype=torch.long)
    scores = processor(input_ids, torch.from_numpy(logits)[None].clone())
    expected = torch.softmax(scores.double(), dim=-1)[0].numpy()
    np.testing.assert_allclose(support_and_probs(sampler, logits), expected, rtol=PROB_RTOL)


def test_penalties_follow_sampled_tokens():
    """sample() records its own tokens: greedy with a strong presence penalty never repeats."""
    vocab = 50
    logits = random_logits(np.random.default_rng(0), vocab, scale=0.1)
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=2.0), [])
    tokens = [sampler.sample(logits).token_id for _ in range(10)]
    assert len(set(tokens)) == 10 and sampler.output_token_ids == tokens


def test_penalties_reject_out_of_vocab_history():
    sampler = Sampler(SamplingParams(repetition_penalty=1.1), [3, 99])
    with pytest.raises(InvalidRequestError):
        sampler.sample(np.zeros(50, dtype=np.float32) + 1)


# ---------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1, 7, 1025, 49152])
@pytest.mark.parametrize(
    "config",
    [
        dict(temperature=0, logprobs=5),
        dict(temperature=0.5, top_p=0.8, logprobs=MAX_LOGPROBS),
        dict(temperature=1.5, repetition_penalty=1.5, frequency_penalty=1.0, logprobs=3),
        dict(logprobs=0),
        dict(),
    ],
)
def test_logprobs_are_raw_log_softmax(vocab, config):
    """Reported logprobs are the log-softmax of the logits as given (vLLM's raw_logprobs),
    unaffected by penalties, temperature or truncation."""
    rng = np.random.default_rng(vocab)
    params = SamplingParams(seed=3, **config)
    sampler = Sampler(params, list(rng.integers(0, vocab, 5)))
    for _ in range(3):
        logits = random_logits(rng, vocab)
        shifted = logits.astype(np.float64) - logits.max()
        log_softmax = shifted - np.log(np.exp(shifted).sum())
        result = sampler.sample(logits)
        assert isinstance(result, SampleResult)
        assert result.logprob == pytest.approx(log_softmax[result.token_id], abs=LOGPROB_ATOL)
        if params.logprobs is None:
            assert result.top_logprobs is None
            continue
        count = min(params.logprobs, vocab)
        assert len(result.top_logprobs) == count
        expected_ids = np.argsort(-log_softmax, kind="stable")[:count]
        assert [t for t, _ in result.top_logprobs] == list(expected_ids)
        np.testing.assert_allclose(
            [lp for _, lp in result.top_logprobs], log_softmax[expected_ids], atol=LOGPROB_ATOL
        )


# ---------------------------------------------------------------------------------------------
# Sampler input handling
# ---------------------------------------------------------------------------------------------


def test_sampler_does_not_modify_logits_and_accepts_other_dtypes():
    rng = np.random.default_rng(1)
    logits = random_logits(rng, 300)
    before = logits.copy()
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, top_p=0.9, seed=1)
    sampler = Sampler(params, list(range(100)))
    for _ in range(20):
        sampler.sample(logits)
    np.testing.assert_array_equal(logits, before)
    for dtype in (np.float16, np.float64):
        assert 0 <= Sampler(params, []).sample(logits.astype(dtype)).token_id < 300


def test_sampler_handles_masked_logits():
    logits = np.full(1000, -np.inf, dtype=np.float32)
    logits[[3, 500, 999]] = [1.0, 2.0, 0.5]
    samples = draw_many(SamplingParams(seed=0, top_p=0.99), logits, 200)
    assert set(samples) <= {3, 500, 999}
    assert draw_many(SamplingParams(seed=0, top_k=1), logits, 1)[0] == 500


@pytest.mark.parametrize(
    "bad", [np.array([1.0, np.nan]), np.array([np.inf, 0.0]), np.full(3, -np.inf), np.ones((2, 3))]
)
def test_sampler_rejects_unusable_logits(bad):
    with pytest.raises(ValueError):
        Sampler(SamplingParams(), []).sample(bad.astype(np.float32))


def test_sampler_rejects_vocab_change_and_bad_record():
    sampler = Sampler(SamplingParams(repetition_penalty=1.2), [])
    sampler.sample(np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError):
        sampler.sample(np.ones(11, dtype=np.float32))
    with pytest.raises(InvalidRequestError):
        sampler.record(10)
    with pytest.raises(InvalidRequestError):
        Sampler(SamplingParams(), [[1, 2]])


def test_plain_greedy_flag():
    assert Sampler(SamplingParams(temperature=0), []).is_plain_greedy
    assert not Sampler(SamplingParams(temperature=0, logprobs=1), []).is_plain_greedy
    assert not Sampler(SamplingParams(temperature=0, presence_penalty=0.1), []).is_plain_greedy
    assert not Sampler(SamplingParams(), []).is_plain_greedy


@pytest.mark.parametrize("size", [1, 5, 1023, 1024, 1025, 1280, 1281, 2047, 49152, 49153])
def test_cumsum_search_matches_plain_cumsum(size):
    """The two-level walk against a float64 cumsum, at block boundaries +- 1 and with zeros."""
    rng = np.random.default_rng(size)
    values = rng.random(size).astype(np.float32)
    values[rng.random(size) < 0.3] = 0
    values[0] = 0.5
    cumulative = np.cumsum(values.astype(np.float64))
    tolerance = 1e-5 * cumulative[-1]
    for fraction in (0.0, 1e-7, 0.25, 0.5, 0.999, 1.0 - 1e-12):
        target = fraction * cumulative[-1]
        for side in ("left", "right"):
            index = _search_cumsum(values, fraction, side)
            assert 0 <= index < size
            assert cumulative[index] >= target - tolerance
            assert index == 0 or cumulative[index - 1] <= target + tolerance
            assert values[index] > 0


# ---------------------------------------------------------------------------------------------
# StopChecker
# ---------------------------------------------------------------------------------------------


def feed(checker: StopChecker, pieces):
    emitted = [checker.append(p) for p in pieces]
    return "".join(u.text for u in emitted), emitted


@pytest.mark.parametrize("include", [False, True])
def test_stop_at_start(include):
    checker = StopChecker(["</s>"], include_stop_str_in_output=include)
    update = checker.append("</s>more")
    assert update.stopped and update.stop_str == "</s>"
    assert update.text == ("</s>" if include else "")
    assert checker.text == update.text and checker.stopped
    with pytest.raises(RuntimeError):
        checker.append("x")


def test_stop_straddling_pieces_is_held_back():
    checker = StopChecker(["###"])
    assert checker.append("ab#") == ("ab", False, None)
    assert checker.held_back == "#"
    assert checker.append("#") == ("", False, None)
    update = checker.append("#c")
    assert update == ("", True, "###")
    assert checker.text == "ab"


def test_stop_straddling_pieces_included():
    out, updates = feed(StopChecker(["###"], include_stop_str_in_output=True), ["ab#", "#", "#c"])
    assert [u.text for u in updates] == ["ab#", "#", "#"]
    assert out == "ab###" and updates[-1].stopped


def test_earliest_stop_string_wins():
    checker = StopChecker(["world", "lo w", "ello"])
    update = checker.append("hello world")
    assert update.stop_str == "ello" and checker.text == "h"
    checker = StopChecker(["world", "lo w"], include_stop_str_in_output=True)
    assert checker.append("hello world").text == "hello w"
    # Same start: the shorter one completes first.
    checker = StopChecker(["abc", "ab"], include_stop_str_in_output=True)
    update = checker.append("xxabcd")
    assert update.stop_str == "ab" and checker.text == "xxab"


def test_partial_match_is_released_when_it_fails():
    checker = StopChecker(["\n\nUser:"])
    out, updates = feed(checker, ["Hi\n", "\n", "Us", "e", "r!", " ok"])
    assert [u.text for u in updates] == ["Hi", "", "", "", "\n\nUser!", " ok"]
    assert out == "Hi\n\nUser! ok" and not checker.stopped


def test_finish_releases_held_back_text():
    checker = StopChecker(["##", "abc"])
    assert checker.append("xyzab#").text == "xyzab"
    assert checker.partial_match_length("xyzab#") == 1
    assert checker.finish() == "#"
    assert checker.text == "xyzab#"
    with pytest.raises(RuntimeError):
        checker.append("more")


def test_no_stop_strings_streams_everything():
    checker = StopChecker.from_params(SamplingParams())
    out, _ = feed(checker, ["a", "bc", ""])
    assert out == "abc" and checker.finish() == ""


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_stop_checker_matches_naive_search(seed, include):
    """Random pieces over a tiny alphabet: the output equals cutting the text at the earliest
    stop string of the first prefix (at piece granularity) that contains one, and everything
    emitted along the way is a prefix of that output."""
    rng = np.random.default_rng(seed)
    alphabet = "ab\n"
    stops = [
        "".join(rng.choice(list(alphabet), rng.integers(1, 5))) for _ in range(rng.integers(1, 4))
    ]
    pieces = ["".join(rng.choice(list(alphabet), rng.integers(0, 4))) for _ in range(30)]

    expected, expected_stop, text = None, None, ""
    for piece in pieces:
        text += piece
        hits = [(text.find(s), len(s), s) for s in stops if s in text]
        if hits:
            start, length, expected_stop = min(hits)
            expected = text[: start + length] if include else text[:start]
            break
    checker = StopChecker(stops, include_stop_str_in_output=include)
    emitted = ""
    for piece in pieces:
        update = checker.append(piece)
        emitted += update.text
        if update.stopped:
            break
        assert not any(s in emitted for s in stops) or include
    if expected is None:
        emitted += checker.finish()
        expected = text
    assert emitted == expected == checker.text
    assert checker.stop_str == expected_stop
