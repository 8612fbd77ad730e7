"""The continuous-batching Scheduler on the real default model: outputs equal one-at-a-time
generation under preemption (a deliberately tiny KV pool), chunked prefill beside decodes under
the step budget, FCFS admission, aborts that free pages, and requests refused up front."""

from __future__ import annotations

import numpy as np
import pytest

from lmengine import LLM, SamplingParams
from lmengine.errors import ContextLengthError, InvalidRequestError, KVCacheFullError
from lmengine.serving import Scheduler
from lmengine.serving.step_cost import StepCostModel

PROMPTS = [
    "The capital of France is",
    "1+1=",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
]


class RecordingEngine:
    """The core engine, with the sequence ids and chunk lengths of every step recorded."""

    def __init__(self, engine):
        self._engine = engine
        self.steps: list[list[tuple[int, int]]] = []

    def step(self, seq_ids, tokens, all_logits):
        self.steps.append([(s, len(t)) for s, t in zip(seq_ids, tokens)])
        return self._engine.step(seq_ids, tokens, all_logits)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def recording_scheduler(llm, **options) -> tuple[RecordingEngine, Scheduler]:
    engine = RecordingEngine(llm._engine)
    scheduler = Scheduler(
        engine, llm.tokenizer, vocab_size=llm.vocab_size, max_context=llm.max_context, **options
    )
    return engine, scheduler


@pytest.fixture(scope="module")
def tiny_pool_llm(smollm2_gguf_path):
    """Four 16-token pages: any two of the requests below fill the pool."""
    return LLM(smollm2_gguf_path, n_threads=2, kv_cache_tokens=64)


def run_to_end(scheduler: Scheduler) -> dict:
    results: dict = {}
    while scheduler.has_unfinished():
        for event in scheduler.step():
            r = results.setdefault(event.request_id, {"ids": [], "text": "", "final": None})
            r["ids"] += event.token_ids
            r["text"] += event.text
            if event.finished:
                r["final"] = event
    return results


def test_preemption_keeps_outputs_equal_to_sequential(tiny_pool_llm):
    llm = tiny_pool_llm
    params = [
        SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0.8, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0, stop=["."]),
        SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, logprobs=2),
    ]
    expected = [llm.generate(p, sp)[0] for p, sp in zip(PROMPTS, params)]

    engine, scheduler = recording_scheduler(llm)
    for i, (p, sp) in enumerate(zip(PROMPTS, params)):
        scheduler.add_request(i, llm.tokenizer.encode(p), sp)
    results = run_to_end(scheduler)

    assert scheduler.stats.preemptions > 0, "the pool was meant to force preemption"
    for i, want in enumerate(expected):
        got = results[i]
        assert got["ids"] == want.token_ids, PROMPTS[i]
        assert got["text"] == want.text
        assert got["final"].finish_reason == want.finish_reason
        assert got["final"].stop_reason == want.stop_reason
    assert results[3]["final"].num_output_tokens == 14
    assert llm._engine.free_pages == llm._engine.total_pages
    assert llm._engine.active_sequences == 0
    # Continuous batching: requests shared steps.
    assert max(len(step) for step in engine.steps) > 1


def test_logprobs_survive_batching(tiny_pool_llm):
    llm = tiny_pool_llm
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)
    want = llm.generate(PROMPTS[0], sp)[0]
    scheduler = Scheduler.for_llm(llm)
    scheduler.add_request("a", llm.tokenizer.encode(PROMPTS[0]), sp)
    scheduler.add_request("b", llm.tokenizer.encode(PROMPTS[1]), SamplingParams(max_tokens=4))
    logprobs, top = [], []
    while scheduler.has_unfinished():
        for event in scheduler.step():
            if event.request_id == "a":
                logprobs += event.logprobs
                top += event.top_logprobs
            else:
                assert event.logprobs is None
    np.testing.assert_allclose(logprobs, want.logprobs, rtol=0, atol=1e-6)
    assert [[t for t, _ in row] for row in top] == [
        [t for t, _ in row] for row in want.top_logprobs
    ]


def test_chunked_prefill_runs_beside_decodes_within_the_budget(smollm2_gguf_path, english_text):
    llm = LLM(smollm2_gguf_path, n_threads=2, kv_cache_tokens=256)
    engine, scheduler = recording_scheduler(llm, max_step_tokens=8)
    long_ids = llm.tokenizer.encode(english_text)[:24]
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    scheduler.add_request("short", llm.tokenizer.encode(PROMPTS[1]), sp)
    scheduler.add_request("long", long_ids, sp)
    results = run_to_end(scheduler)

    assert max(sum(n for _, n in step) for step in engine.steps) <= 8
    # Some step decodes one sequence while it prefills a chunk of the other.
    assert any(
        len(step) == 2 and sorted(n for _, n in step)[0] == 1 and sorted(n for _, n in step)[1] > 1
        for step in engine.steps
    )
    assert results["short"]["ids"] == llm.generate(PROMPTS[1], sp)[0].token_ids
    assert results["long"]["ids"] == llm.generate_ids(long_ids, sp).token_ids


def test_admission_is_first_come_first_served(tiny_pool_llm):
    llm = tiny_pool_llm
    scheduler = Scheduler.for_llm(llm, max_running=1)
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for name in ("first", "second", "third"):
        scheduler.add_request(name, llm.tokenizer.encode(PROMPTS[0]), sp)
    order = [e.request_id for e in _finals(scheduler)]
    assert order == ["first", "second", "third"]


def _finals(scheduler):
    while scheduler.has_unfinished():
        yield from (e for e in scheduler.step() if e.finished)


def test_abort_frees_pages_at_once(tiny_pool_llm):
    llm = tiny_pool_llm
    eng = llm._engine
    scheduler = Scheduler.for_llm(llm, max_running=2)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    scheduler.add_request("keep", llm.tokenizer.encode(PROMPTS[0]), sp)
    scheduler.add_request("drop", llm.tokenizer.encode(PROMPTS[2]), sp)
    scheduler.add_request("queued", llm.tokenizer.encode(PROMPTS[3]), sp)
    first_ids = [e.token_ids for e in scheduler.step() + scheduler.step() if e.request_id == "keep"]
    held = eng.total_pages - eng.free_pages
    event = scheduler.abort("drop")
    assert event.finished and event.finish_reason == "abort" and event.num_output_tokens == 2
    assert eng.total_pages - eng.free_pages < held
    assert scheduler.abort("drop") is None and scheduler.abort("never") is None
    assert scheduler.abort("queued").finish_reason == "abort"
    results = run_to_end(scheduler)
    assert set(results) == {"keep"}
    keep_ids = [t for ids in first_ids for t in ids] + results["keep"]["ids"]
    assert keep_ids == llm.generate(PROMPTS[0], sp)[0].token_ids
    assert eng.free_pages == eng.total_pages and eng.active_sequences == 0


def test_requests_that_can_never_run_are_refused(smollm2_gguf_path, tiny_pool_llm):
    llm = tiny_pool_llm
    scheduler = Scheduler.for_llm(llm)
    ids = llm.tokenizer.encode(PROMPTS[2])
    with pytest.raises(KVCacheFullError, match="pool"):
        scheduler.add_request("big", ids, SamplingParams(max_tokens=80))
    with pytest.raises(InvalidRequestError, match="empty"):
        scheduler.add_request("empty", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="out of range"):
        scheduler.add_request("bad", [1, llm.vocab_size], SamplingParams())
    scheduler.add_request("ok", ids, SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        scheduler.add_request("ok", ids, SamplingParams(max_tokens=2))
    assert scheduler.abort("ok") is not None

    short = LLM(smollm2_gguf_path, n_threads=1, max_context=16, kv_cache_tokens=64)
    with pytest.raises(ContextLengthError, match="context"):
        Scheduler.for_llm(short).add_request("long", list(range(100, 120)), SamplingParams())


class FrozenCostModel(StepCostModel):
    """A step-time model with fixed coefficients: ignores the real steps it is shown."""

    def __init__(self, a, b, c, e):
        super().__init__()
        self._fixed = np.array([a, b, c, e])

    def observe(self, *args):
        pass

    @property
    def ready(self):
        return True

    @property
    def coefficients(self):
        return self._fixed


def test_step_time_target_keeps_prompt_chunks_to_the_slack_of_decode_steps(
    smollm2_gguf_path, english_text
):
    llm = LLM(smollm2_gguf_path, n_threads=2, kv_cache_tokens=512)
    engine, scheduler = recording_scheduler(llm, step_time_target=0.04)
    # 10 ms a step + 1 ms a decode + 5 ms a prompt token: one decode leaves room for 5 tokens.
    scheduler.cost_model = FrozenCostModel(0.010, 0.001, 0.005, 0.0)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    long_ids = llm.tokenizer.encode(english_text)[:23]
    scheduler.add_request("short", llm.tokenizer.encode(PROMPTS[0]), sp)
    first = scheduler.step()  # the short prompt alone: no decodes yet, so no limit
    scheduler.add_request("long", long_ids, sp)
    results = run_to_end(scheduler)
    results["short"]["ids"][:0] = [t for e in first for t in e.token_ids]

    mixed = [step for step in engine.steps[1:] if any(n == 1 for _, n in step) and len(step) > 1]
    assert mixed, "the long prompt was meant to be prefilled beside the short one's decodes"
    for step in mixed:
        assert sum(n for _, n in step if n > 1) <= 5, step
    assert results["short"]["ids"] == llm.generate(PROMPTS[0], sp)[0].token_ids
    assert results["long"]["ids"] == llm.generate_ids(long_ids, sp).token_ids


def test_step_time_target_sizes_the_running_batch(smollm2_gguf_path):
    llm = LLM(smollm2_gguf_path, n_threads=2, kv_cache_tokens=512)
    engine, scheduler = recording_scheduler(llm, step_time_target=0.0125)
    # 10 ms a step + 1 ms a decode: two decodes fit 12.5 ms, three do not.
    scheduler.cost_model = FrozenCostModel(0.010, 0.001, 0.0, 0.0)
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        scheduler.add_request(i, llm.tokenizer.encode(prompt), sp)
    results = run_to_end(scheduler)
    assert max(len(step) for step in engine.steps) == 2
    for i, prompt in enumerate(PROMPTS):
        assert results[i]["ids"] == llm.generate(prompt, sp)[0].token_ids


def test_step_time_target_is_validated(tiny_pool_llm):
    with pytest.raises(InvalidRequestError, match="step_time_target"):
        Scheduler.for_llm(tiny_pool_llm, step_time_target=0)


def test_step_cost_model_recovers_a_linear_cost_and_sizes_the_slack():
    rng = np.random.default_rng(0)
    model = StepCostModel(window=64)
    assert model.prefill_allowance(4, 0, 100.0, 0, 0.05) is None  # no samples yet
    a, b, c, e = 0.012, 0.0008, 0.004, 0.0003
    for _ in range(64):
        n_dec, n_pre = int(rng.integers(0, 16)), int(rng.integers(0, 64))
        attended = float(rng.integers(0, 20000))
        t = a + b * n_dec + c * n_pre + e * attended / 1000
        model.observe(n_dec, n_pre, attended, t * (1 + rng.normal(0, 0.01)))
    np.testing.assert_allclose(model.coefficients, [a, b, c, e], rtol=0.1, atol=2e-4)
    # 8 decodes over 4000 positions leave 0.05 - 0.0196 = 30.4 ms: about 7 tokens at
    # position 100 (4 ms each plus their attention), none when the decodes alone fill it.
    n = model.prefill_allowance(8, 0, 4000.0, 100, 0.05)
    assert 6 <= n <= 8
    cost = model.predict(8, n, 4000.0 + n * 100 + n * (n + 1) / 2)
    assert cost <= 0.05 * 1.001
    assert model.prefill_allowance(60, 0, 4000.0, 100, 0.05) == 0
    # Steps of one kind only (all decodes): the unseen prompt cost is not guessed as negative.
    only = StepCostModel()
    for n_dec in range(1, 17):
        only.observe(n_dec, 0, 0.0, 0.01 + 0.001 * n_dec)
    assert (only.coefficients >= 0).all()
