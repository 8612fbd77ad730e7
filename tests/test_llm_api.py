"""The public API on the real default model: generation, streaming, chat, sampling options,
batching invariance, and every kind of bad input reaching a typed exception."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lmengine import LLM, SamplingParams
from lmengine.errors import (
    ContextLengthError,
    InvalidRequestError,
    KVCacheFullError,
    LMEngineError,
    ModelFileError,
    ModelNotFoundError,
    SamplingParamsError,
    UnsupportedModelError,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_generate_outputs_in_order_and_decode_consistently(smollm2):
    outs = smollm2.generate(["The capital of France is", "1+1="], GREEDY)
    assert [o.prompt for o in outs] == ["The capital of France is", "1+1="]
    for o in outs:
        assert len(o.token_ids) == 12 and o.finish_reason == "length"
        assert o.text == smollm2.tokenizer.decode(o.token_ids)
    assert "Paris" in outs[0].text


def test_stream_pieces_concatenate_to_generate_text(smollm2):
    prompt = "Once upon a time"
    full = smollm2.generate(prompt, GREEDY)[0].text
    pieces = list(smollm2.stream(prompt, GREEDY))
    assert len(pieces) > 1 and "".join(pieces) == full


def test_batching_changes_nothing(smollm2, english_text):
    # 8 prompts of different lengths: greedy output alone == inside the batch.
    words = english_text.split()
    prompts = [" ".join(words[i * 37 : i * 37 + 3 + 11 * i]) for i in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    batched = smollm2.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        alone = smollm2.generate(prompt, params)[0]
        assert alone.token_ids == out.token_ids, prompt
    assert smollm2.kv_cache_usage()["active_sequences"] == 0


def test_chunked_prefill_matches_single_prefill(smollm2_gguf_path, english_text):
    small_steps = LLM(smollm2_gguf_path, n_threads=2, kv_cache_tokens=1024, max_step_tokens=7)
    ids = small_steps.tokenizer.encode(english_text)[:90]
    a = small_steps.generate_ids(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    b = LLM(smollm2_gguf_path, n_threads=1, kv_cache_tokens=1024).generate_ids(
        ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    assert a.token_ids == b.token_ids


def test_seed_determinism(smollm2):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    a = smollm2.generate("In a small village", p)[0]
    b = smollm2.generate("In a small village", p)[0]
    assert a.token_ids == b.token_ids
    others = {
        tuple(
            smollm2.generate("In a small village", SamplingParams(**{**p.__dict__, "seed": s}))[
                0
            ].token_ids
        )
        for s in range(4)
    }
    assert len(others) > 1


def test_stop_string_cuts_text(smollm2):
    base = smollm2.generate(
        "The capital of France is", SamplingParams(max_tokens=16, temperature=0)
    )[0]
    stop = base.text[5:9]
    assert stop.strip()
    out = smollm2.generate(
        "The capital of France is", SamplingParams(max_tokens=16, temperature=0, stop=[stop])
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.index(stop)]
    streamed = "".join(
        smollm2.stream(
            "The capital of France is", SamplingParams(max_tokens=16, temperature=0, stop=[stop])
        )
    )
    assert streamed == out.text


def test_stop_token_ids(smollm2):
    base = smollm2.generate("1+1=", GREEDY)[0]
    target = base.token_ids[4]
    out = smollm2.generate(
        "1+1=", SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[target])
    )[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == target
    assert out.token_ids == base.token_ids[: base.token_ids.index(target) + 1]


def test_logprobs_are_log_softmax_of_logits(smollm2):
    ids = smollm2.tokenizer.encode("The quick brown fox")
    out = smollm2.generate_ids(
        ids, SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    )
    logits = smollm2.logits(ids + out.token_ids[:-1])[len(ids) - 1 :].astype(np.float64)
    logsm = logits - logits.max(-1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(-1, keepdims=True))
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(logsm[i, tok], abs=2e-3)
        top = out.top_logprobs[i]
        assert len(top) == 3 and top[0][0] == tok
        assert [t for t, _ in top] == list(np.argsort(-logsm[i])[:3])


def test_chat_uses_template(smollm2):
    text = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    assert "Hi" in text and text != "Hi"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_tokens=24, temperature=0)
    out = smollm2.chat(messages, params)
    assert out.finish_reason in ("stop", "length") and len(out.token_ids) > 0
    templated = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = smollm2.tokenizer.encode(templated, add_special_tokens=False)
    assert ids[0] == smollm2.tokenizer.token_to_id("<|im_start|>")
    assert smollm2.generate_ids(ids, params).token_ids == out.token_ids


def test_logits_shapes_and_errors(smollm2):
    ids = smollm2.tokenizer.encode("Hello world, this is a test")
    assert smollm2.logits(ids).shape == (len(ids), smollm2.vocab_size)
    with pytest.raises(InvalidRequestError, match="prefill"):
        smollm2.logits(ids, prefill=len(ids) + 1)
    with pytest.raises(InvalidRequestError, match="out of range"):
        smollm2.logits([1, 2, smollm2.vocab_size])
    with pytest.raises(InvalidRequestError, match="empty"):
        smollm2.logits([])


# -- bad requests -----------------------------------------------------------------------------


def test_bad_requests_raise_typed_errors(smollm2):
    with pytest.raises(InvalidRequestError, match="empty"):
        smollm2.generate("")
    with pytest.raises(InvalidRequestError, match="out of range"):
        smollm2.generate_ids([5, -1, 7])
    with pytest.raises(InvalidRequestError):
        smollm2.generate([None])  # type: ignore[list-item]
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        SamplingParams(max_tokens=-3)
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(SamplingParamsError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    # Nothing leaked: every sequence was freed.
    assert smollm2.kv_cache_usage()["active_sequences"] == 0


def test_prompt_longer_than_context(smollm2_gguf_path):
    llm = LLM(smollm2_gguf_path, n_threads=1, max_context=64, kv_cache_tokens=256)
    with pytest.raises(ContextLengthError, match="context"):
        llm.generate_ids(list(range(100, 180)))
    with pytest.raises(ContextLengthError):
        llm.logits(list(range(100, 180)))
    # max_tokens is clipped at the context end: finish_reason says so.
    out = llm.generate_ids(
        list(range(100, 150)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    )
    assert len(out.token_ids) == 14 and out.finish_reason == "length"


def test_kv_pool_too_small(smollm2_gguf_path):
    llm = LLM(smollm2_gguf_path, n_threads=1, kv_cache_tokens=64)
    with pytest.raises(KVCacheFullError, match="KV"):
        llm.generate_ids(list(range(100, 150)), SamplingParams(max_tokens=40))
    # Requests that fit one at a time but not together are queued, not failed.
    outs = llm.generate_batch_ids(
        [list(range(100, 130))] * 3, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    assert all(len(o.token_ids) == 8 for o in outs)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids


def test_bad_engine_options(smollm2_gguf_path):
    with pytest.raises(InvalidRequestError, match="kv_dtype"):
        LLM(smollm2_gguf_path, kv_dtype="int3")
    with pytest.raises(InvalidRequestError):
        LLM(smollm2_gguf_path, kv_cache_tokens=4)
    with pytest.raises(KVCacheFullError, match="GiB"):
        LLM(smollm2_gguf_path, kv_cache_tokens=10**12)


# -- bad files --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        LLM(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError):
        LLM("not-a-registry-model")


def test_wrong_magic(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"NOTAGGUF" + bytes(range(256)) * 10)
    with pytest.raises(ModelFileError):
        LLM(p)


@pytest.mark.parametrize("keep", [12, 1000, 5_000_000, 60_000_000])
def test_truncated_gguf(tmp_path, smollm2_gguf_path, keep):
    p = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(keep))
    with pytest.raises(ModelFileError):
        LLM(p)


def _write_gguf(path, arch="llama", q_rows=64, q_type=None):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(40)
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", f32(40, 64))
    w.add_tensor("output_norm.weight", f32(64))
    w.add_tensor("blk.0.attn_norm.weight", f32(64))
    if q_type is None:
        w.add_tensor("blk.0.attn_q.weight", f32(q_rows, 64))
    else:
        raw = gguf.quants.quantize(f32(q_rows, 64), q_type)
        w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=q_type)
    w.add_tensor("blk.0.attn_k.weight", f32(32, 64))
    w.add_tensor("blk.0.attn_v.weight", f32(32, 64))
    w.add_tensor("blk.0.attn_output.weight", f32(64, 64))
    w.add_tensor("blk.0.ffn_norm.weight", f32(64))
    w.add_tensor("blk.0.ffn_gate.weight", f32(96, 64))
    w.add_tensor("blk.0.ffn_up.weight", f32(96, 64))
    w.add_tensor("blk.0.ffn_down.weight", f32(64, 96))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architecture(tmp_path):
    with pytest.raises(UnsupportedModelError, match="architecture"):
        LLM(_write_gguf(tmp_path / "a.gguf", arch="mamba9"))


def test_tensor_shape_inconsistent_with_metadata(tmp_path):
    with pytest.raises(ModelFileError, match="attn_q"):
        LLM(_write_gguf(tmp_path / "a.gguf", q_rows=48))


def test_unsupported_tensor_type_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    with pytest.raises(UnsupportedModelError, match=r"attn_q.*Q5_1"):
        LLM(_write_gguf(tmp_path / "a.gguf", q_type=gguf.GGMLQuantizationType.Q5_1))


def test_errors_share_a_base_class():
    for cls in (
        ContextLengthError,
        InvalidRequestError,
        KVCacheFullError,
        ModelFileError,
        ModelNotFoundError,
        SamplingParamsError,
        UnsupportedModelError,
    ):
        assert issubclass(cls, LMEngineError)


def test_safetensors_dir_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        LLM(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError):
        LLM(tmp_path)
    shutil.rmtree(tmp_path)


def test_long_decode_matches_prefill(smollm2, english_text):
    # Hundreds of decode steps past the first prefill: every per-step buffer must keep growing
    # correctly (a too-small attention scratch once corrupted the heap here).
    ids = smollm2.tokenizer.encode(english_text)[:700]
    full = smollm2.logits(ids)
    stepped = smollm2.logits(ids, prefill=300)
    assert np.max(np.abs(full - stepped)) <= 1e-3 * (full.max() - full.min())
