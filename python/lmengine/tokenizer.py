"""Text <-> token ids, chat templates and streaming detokenization.

:class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust one; no transformers)
and is built either from a ``tokenizer.json`` or from a GGUF file's metadata. The GGUF path
rebuilds what transformers' GGUF conversion builds, so ids match
``AutoTokenizer.from_pretrained(dir, gguf_file=name)``:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from the stored tokens and merges, split
  first by the regexes llama.cpp and the original ``tokenizer.json`` use for
  ``tokenizer.ggml.pre``.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback. Spaces become
  ``▁`` and one is prepended to the text when ``tokenizer.ggml.add_space_prefix`` (default on).
  Merges come from the file, or are rebuilt from the token scores: a pair merges with the score
  of the token it forms, which is the order SentencePiece applies them in.

Tokens the file types as control (3) are added as special tokens: matched whole in text and
dropped by ``decode(skip_special_tokens=True)``. User-defined tokens (4) are matched whole too but
decode as text, as in llama.cpp and transformers (Gemma's whitespace-run and HTML tokens are
user-defined, so skipping them would lose text).
"""

from __future__ import annotations

import json
import os
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from itertools import accumulate, repeat
from operator import itemgetter
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _BackendTokenizer

from lmengine.errors import (
    InvalidRequestError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)

__all__ = ["Tokenizer", "IncrementalDetokenizer"]

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_SPIECE_SPACE = "\u2581"  # ▁, SentencePiece's visible space

# Texts of tokens that end a turn. One of them counts as a stop token when the chat template
# writes it (the template is how the model learned to end its answers).
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|return|>",
    "<|end_of_turn|>",
    "<EOT>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek's <｜end▁of▁sentence｜>
    "<end_of_utterance>",
    "</s>",
)

# Pre-tokenizer split regexes, copied from the tokenizer.json files of the model families
# (llama.cpp's llama-vocab.cpp carries the same ones under these names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's regex is built into pre_tokenizers.ByteLevel(use_regex=True); these two markers
# select it alone, or after isolating every digit.
_GPT2_SPLIT = "gpt2"
_DIGITS_THEN_GPT2_SPLIT = "digits+gpt2"

_BYTE_LEVEL_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        [
            "default",
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
            "mellum",
            "modern-bert",
            "roberta-bpe",
            "jina-es",
            "jina-de",
            "jina-v1-en",
            "jina-v2-es",
            "jina-v2-de",
            "jina-v2-code",
            "gigachat",
            "a.x-4.0",
        ],
        _GPT2_SPLIT,
    ),
    **dict.fromkeys(
        [
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        _DIGITS_THEN_GPT2_SPLIT,
    ),
    **dict.fromkeys(
        [
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
            "chatglm-bpe",
            "glm4",
        ],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(
        [
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        _QWEN2_SPLIT,
    ),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
# Pre-tokenizers whose original tokenizer.json sets BPE "ignore_merges": a pre-token that is a
# whole vocabulary entry maps to it directly (llama.cpp does the same for these).
_IGNORE_MERGES_PRE = frozenset(
    [
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "tekken",
    ]
)
# SentencePiece architectures whose GGUF vocabulary needs Gemma's treatment (see _build_spm).
_GEMMA_ARCHITECTURES = frozenset(["gemma", "gemma2", "gemma3", "gemma3n"])


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


@lru_cache(maxsize=1)
def _outside_byte_alphabet() -> re.Pattern[str]:
    alphabet = "".join(sorted(_byte_to_unicode().values()))
    return re.compile(f"[^{re.escape(alphabet)}]")


def _indices_outside_byte_alphabet(tokens: list[str]) -> list[int]:
    """Indices of the tokens holding a character outside GPT-2's byte alphabet.

    One regex scan over all tokens joined (an alphabet character as the separator), then a
    bisect per hit: a few times faster than testing 49k tokens one by one; hits are few.
    """
    joined = "!".join(tokens)
    starts = list(accumulate((len(token) + 1 for token in tokens), initial=0))
    indices = {
        bisect_right(starts, m.start()) - 1 for m in _outside_byte_alphabet().finditer(joined)
    }
    return sorted(indices)


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    """``["a b", ...]`` -> ``[("a", "b"), ...]``, splitting at the first space after position 0."""
    # Fast path (C loops only): when every merge holds exactly one space, joining with spaces
    # and splitting again alternates left and right pieces.
    pieces = " ".join(merges).split(" ")
    if len(pieces) == 2 * len(merges) and all(pieces[0::2]):
        alternating = iter(pieces)
        return list(zip(alternating, alternating))
    return [
        (merge[:split], merge[split + 1 :]) for merge in merges for split in (merge.find(" ", 1),)
    ]


def _merges_from_scores(tokens: list[str], ranks: Sequence[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first.

    Every split of a token into two vocabulary entries is a merge, ranked by that token's
    ``ranks`` value (higher merges first). Ties: longer left piece, then longer right piece,
    then token order, then piece ids -- the order transformers' ``generate_merges`` produces,
    so ids match it exactly.

    Vectorized over tokens, one cut position at a time (C-level ``map``/``dict.get`` plus one
    numpy lexsort). The cost is one slice and hash per character of the vocabulary: ~2.5 s
    CPU for Gemma-3's 262k tokens (1.5M characters, 515k merges) on a busy machine.
    """
    token_ids = dict(zip(tokens, range(len(tokens))))
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    lefts, rights, owners = [], [], []
    for cut in range(1, int(lengths.max(initial=0))):
        owner = np.flatnonzero(lengths > cut)
        group = list(map(tokens.__getitem__, owner.tolist()))
        left = np.fromiter(
            map(token_ids.get, map(itemgetter(slice(None, cut)), group), repeat(-1)),
            dtype=np.int64,
            count=len(group),
        )
        right = np.fromiter(
            map(token_ids.get, map(itemgetter(slice(cut, None)), group), repeat(-1)),
            dtype=np.int64,
            count=len(group),
        )
        valid = (left >= 0) & (right >= 0)
        lefts.append(left[valid])
        rights.append(right[valid])
        owners.append(owner[valid])
    if not lefts:
        return []
    left, right, owner = np.concatenate(lefts), np.concatenate(rights), np.concatenate(owners)
    rank = np.asarray(ranks, dtype=np.float64)[owner]
    left_length = lengths[left]
    right_length = lengths[right]
    # np.lexsort sorts by the last key first.
    order = np.lexsort((right, left, owner, -right_length, -left_length, -rank))
    return list(
        zip(
            map(tokens.__getitem__, left[order].tolist()),
            map(tokens.__getitem__, right[order].tolist()),
        )
    )


def _special_token_content(value: Any) -> str | None:
    """A bos/eos/... entry of tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _plain_template_data(value: Any) -> Any:
    """A copy made of plain dicts and lists, so templates never touch the caller's objects."""
    if isinstance(value, Mapping):
        return {str(key): _plain_template_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_template_data(item) for item in value]
    return value


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for the template; keys set to ``None`` (``content=None`` from OpenAI-style
    clients) are dropped, as transformers does, since templates test for missing keys."""
    if not messages:
        raise InvalidRequestError("Cannot apply a chat template to an empty conversation.")
    plain = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"A chat message must be a mapping, got {message!r}.")
        plain.append(
            {key: item for key, item in _plain_template_data(message).items() if item is not None}
        )
    return plain


class Tokenizer:
    """A text tokenizer with the special-token and chat-template knowledge a model file carries.

    Build with :meth:`from_file` (``tokenizer.json``), :meth:`from_gguf_metadata` or
    :meth:`from_gguf`. ``vocab_size`` counts every id the tokenizer can produce, including
    added tokens.
    """

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        extra_eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        named_chat_templates: Mapping[str, str] | None = None,
    ):
        """Wrap ``backend``, whose post-processor must add no tokens: BOS/EOS are added here."""
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None
        self.add_eos_token = bool(add_eos_token) and eos_token_id is not None
        self.chat_template = chat_template
        self.named_chat_templates = dict(named_chat_templates or {})
        self._compiled_templates: dict[str, Any] = {}
        self._special_token_ids: frozenset[int] | None = None
        self._byte_fallback_token_ids: frozenset[int] | None = None

        stop_ids = {eos_token_id, *extra_eos_token_ids}
        templates = " ".join(filter(None, [chat_template, *self.named_chat_templates.values()]))
        for text in _END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(text)
            if token_id is not None and text in templates:
                stop_ids.add(token_id)
        stop_ids.discard(None)
        self.eos_token_ids: frozenset[int] = frozenset(stop_ids)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a GGUF file's metadata and build its tokenizer."""
        from lmengine.models.gguf_metadata import read_gguf_metadata

        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes, from ``read_gguf_metadata``'s dict."""
        tokenizer_model = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokenizer_model is None or tokens is None:
            raise ModelFileError("GGUF metadata has no tokenizer (tokenizer.ggml.model/tokens).")
        token_types = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_TYPE_NORMAL] * len(
            tokens
        )
        if len(token_types) != len(tokens):
            raise ModelFileError(
                f"GGUF tokenizer has {len(tokens)} tokens but {len(token_types)} token types."
            )

        if tokenizer_model == "gpt2":
            backend = _build_byte_level_bpe(metadata, tokens, token_types)
            default_add_bos = False
        elif tokenizer_model == "llama":
            backend = _build_spm(metadata, tokens, token_types)
            default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise UnsupportedModelError(
                f"GGUF tokenizer model {tokenizer_model!r} is not supported "
                "(supported: 'gpt2', 'llama')."
            )

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return value if isinstance(value, int) and 0 <= value < len(tokens) else None

        extra_eos = [token_id("eot_token_id"), token_id("eom_token_id")]
        named_templates = {
            key.removeprefix("tokenizer.chat_template."): value
            for key, value in metadata.items()
            if key.startswith("tokenizer.chat_template.") and isinstance(value, str)
        }
        return cls(
            backend,
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            extra_eos_token_ids=[i for i in extra_eos if i is not None],
            pad_token_id=token_id("padding_token_id"),
            unk_token_id=token_id("unknown_token_id"),
            add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", default_add_bos),
            add_eos_token=metadata.get("tokenizer.ggml.add_eos_token", False),
            chat_template=metadata.get("tokenizer.chat_template"),
            named_chat_templates=named_templates,
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        tokenizer_config: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """Load a ``tokenizer.json`` (or a directory holding one), Hugging Face style.

        ``tokenizer_config`` is the parsed ``tokenizer_config.json``; when ``None`` it is read
        from beside the file if present, as are ``chat_template.jinja`` and, for extra stop ids,
        ``generation_config.json``. BOS is added when the config says ``add_bos_token``, or,
        when it does not say, when the file's post-processor adds it.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"No tokenizer file at {path!r}.")
        directory = os.path.dirname(path)
        try:
            backend = _BackendTokenizer.from_file(path)
        except Exception as error:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFileError(f"{path} is not a valid tokenizer.json: {error}") from error

        if tokenizer_config is None:
            tokenizer_config = _read_json_if_present(
                os.path.join(directory, "tokenizer_config.json")
            )
        config = dict(tokenizer_config or {})

        def config_token_id(name: str) -> int | None:
            content = _special_token_content(config.get(name))
            return backend.token_to_id(content) if content is not None else None

        bos_token_id = config_token_id("bos_token")
        eos_token_id = config_token_id("eos_token")

        # BOS/EOS are added by this class, so that encode() behaves the same for every source.
        added_by_file = backend.encode("", add_special_tokens=True).ids
        backend.post_processor = None
        if bos_token_id is None and added_by_file and "add_bos_token" not in config:
            bos_token_id = added_by_file[0]  # no config: the file's post-processor knows
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bool(added_by_file) and added_by_file[0] == bos_token_id
        add_eos = config.get("add_eos_token")
        if add_eos is None:
            add_eos = bool(added_by_file) and added_by_file[-1] == eos_token_id

        chat_template = config.get("chat_template")
        named_templates: dict[str, str] = {}
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
            named_templates = {entry["name"]: entry["template"] for entry in chat_template}
            chat_template = named_templates.pop("default", None)
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if chat_template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as file:
                chat_template = file.read()

        generation_config = _read_json_if_present(os.path.join(directory, "generation_config.json"))
        extra_eos = (generation_config or {}).get("eos_token_id", [])
        if isinstance(extra_eos, int):
            extra_eos = [extra_eos]

        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            extra_eos_token_ids=extra_eos,
            pad_token_id=config_token_id("pad_token"),
            unk_token_id=config_token_id("unk_token"),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=chat_template,
            named_chat_templates=named_templates,
        )

    # ---------------------------------------------------------------- vocabulary

    @property
    def backend(self) -> _BackendTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if not 0 <= token_id < self._vocab_size:
            return None
        return self._backend.id_to_token(token_id)

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens: matched whole, dropped when skipping specials."""
        if self._special_token_ids is None:
            added = self._backend.get_added_tokens_decoder()
            self._special_token_ids = frozenset(i for i, token in added.items() if token.special)
        return self._special_token_ids

    @property
    def byte_fallback_token_ids(self) -> frozenset[int]:
        """Ids of the ``<0xXX>`` byte tokens when the model falls back to bytes; else empty."""
        if self._byte_fallback_token_ids is None:
            ids: frozenset[int] = frozenset()
            if getattr(self._backend.model, "byte_fallback", False):
                ids = frozenset(
                    self._backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256)
                ) - {None}
            self._byte_fallback_token_ids = ids
        return self._byte_fallback_token_ids

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens``, BOS/EOS if the model wants them.

        Special-token texts inside ``text`` (e.g. ``<|im_start|>``) map to their ids. Text
        rendered by :meth:`apply_chat_template` already holds the template's BOS: encode it with
        ``add_special_tokens=False`` (or use :meth:`encode_chat`).
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"encode expects str, got {type(text).__name__}.")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token:
                ids.append(self.eos_token_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """:meth:`encode` for many texts, in parallel on the Rust side."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        suffix = [self.eos_token_id] if add_special_tokens and self.add_eos_token else []
        return [prefix + encoding.ids + suffix for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary [0, {self._vocab_size})."
            )
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh :class:`IncrementalDetokenizer` over this tokenizer."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's Jinja chat template, as transformers does.

        The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``,
        ``bos_token``/``eos_token``/``unk_token``/``pad_token`` and ``kwargs``. ``chat_template``
        names one of the file's named templates (e.g. ``"tool_use"``) or is a template itself.
        Raises ``InvalidRequestError`` when the model has no template or the template rejects
        the conversation (``raise_exception``).
        """
        template_source = self._select_chat_template(chat_template, tools)
        messages = _template_messages(messages)
        context = {
            "bos_token": self._token_text(self.bos_token_id),
            "eos_token": self._token_text(self.eos_token_id),
            "unk_token": self._token_text(self.unk_token_id),
            "pad_token": self._token_text(self.pad_token_id),
        }
        context.update(kwargs)
        import jinja2

        template = self._compiled_templates.get(template_source)
        if template is None:
            try:
                template = _chat_template_environment().from_string(template_source)
            except jinja2.TemplateSyntaxError as error:
                raise ModelFileError(
                    f"The model's chat template does not parse: {error}"
                ) from error
            self._compiled_templates[template_source] = template
        try:
            return template.render(
                messages=messages,
                tools=_plain_template_data(tools),
                documents=_plain_template_data(documents),
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.TemplateError as error:
            raise InvalidRequestError(
                f"Chat template rejected the conversation: {error}"
            ) from error

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Ids of the rendered chat; the template writes BOS, so none is added (as transformers)."""
        prompt = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(prompt, add_special_tokens=False)

    def _select_chat_template(self, chat_template: str | None, tools: Any) -> str:
        if chat_template is not None:
            return self.named_chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.named_chat_templates:
            return self.named_chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        raise InvalidRequestError("This model has no chat template; pass a plain prompt instead.")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    ``add(id)`` returns the text the new token completes (often ``""`` while a multi-byte
    character is still partial); ``flush()`` returns whatever is held back at the end. The
    concatenation of every ``add`` and the final ``flush`` equals ``decode(all ids)``.

    Invariant: ``ids[prefix_offset:read_offset]`` decodes to text already returned and starts
    where decoding is additive (a character boundary outside any byte-token run). Decoding the
    window from there rather than from 0 keeps each step O(window) while giving the decoder the
    context it needs (e.g. a leading ``▁`` is stripped only at the start of the whole text: both
    decodes below strip it alike).

    Byte-fallback vocabularies: the ``tokenizers`` ByteFallback decoder turns a whole run of
    ``<0xXX>`` tokens into one U+FFFD per byte when the run is not valid UTF-8, so a later
    invalid byte can change the text of earlier, valid ones. Text is therefore held while the
    last token is a byte token (or a skipped special token, which does not end a run); a
    character spelled in bytes is returned with the first ordinary token after it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._run_continuing_ids = tokenizer.byte_fallback_token_ids
        if self._run_continuing_ids and skip_special_tokens:
            self._run_continuing_ids = self._run_continuing_ids | tokenizer.special_token_ids

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def add(self, token_id: int) -> str:
        """Append one token id; return the newly completed text (possibly empty)."""
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise InvalidRequestError(
                f"token id {token_id} is outside the vocabulary [0, {self._tokenizer.vocab_size})."
            )
        self._ids.append(token_id)
        return self._emit(final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Append several ids at once; return their completed text."""
        token_ids = list(token_ids)
        if token_ids and not 0 <= min(token_ids) <= max(token_ids) < self._tokenizer.vocab_size:
            raise InvalidRequestError(
                f"token ids outside the vocabulary [0, {self._tokenizer.vocab_size})."
            )
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return the held-back tail (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        ids = self._ids
        if not final and ids and ids[-1] in self._run_continuing_ids:
            return ""
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        prefix_text = decode(ids[self._prefix_offset : self._read_offset], skip)
        new_text = decode(ids[self._prefix_offset :], skip)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(ids)
        return new_text[len(prefix_text) :]


# -------------------------------------------------------------------- builders


def _build_byte_level_bpe(
    metadata: Mapping[str, Any], tokens: list[str], token_types: list[int]
) -> _BackendTokenizer:
    """GPT-2-style byte-level BPE ('gpt2' tokenizer model)."""
    pre_name = metadata.get("tokenizer.ggml.pre") or "default"
    split = _BYTE_LEVEL_SPLITS.get(pre_name)
    if split is None:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {pre_name!r} is not supported; "
            f"supported: {sorted(_BYTE_LEVEL_SPLITS)}."
        )
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelFileError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges.")

    # Normal tokens are stored in GPT-2's byte alphabet; added tokens (control, user-defined)
    # are stored as plain text, and stay so: they are matched whole as added tokens and the
    # ByteLevel decoder passes a token holding non-alphabet characters through unchanged.
    byte_to_char = _byte_to_unicode()
    vocab = dict(zip(tokens, range(len(tokens))))
    for index in _indices_outside_byte_alphabet(tokens):
        if token_types[index] not in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            token = tokens[index]
            del vocab[token]
            vocab["".join(byte_to_char[b] for b in token.encode("utf-8"))] = index
    _check_unique(vocab, tokens)

    model = models.BPE(
        vocab=vocab,
        merges=_split_merges(merges),
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        ignore_merges=pre_name in _IGNORE_MERGES_PRE,
    )
    backend = _BackendTokenizer(model)
    if split == _GPT2_SPLIT:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_THEN_GPT2_SPLIT:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, tokens, token_types)
    return backend


def _build_spm(
    metadata: Mapping[str, Any], tokens: list[str], token_types: list[int]
) -> _BackendTokenizer:
    """SentencePiece-style BPE with byte fallback ('llama' tokenizer model).

    Gemma files differ in two ways (both as transformers handles them): a token made of a run
    of spaces is stored as real spaces but must be looked up as ``▁▁..``, and the merge order
    is the file order, not the scores.
    """
    architecture = metadata.get("general.architecture")
    is_gemma = architecture in _GEMMA_ARCHITECTURES
    stored_tokens = tokens
    if is_gemma:
        tokens = [_SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    _check_unique(vocab, tokens)

    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        merge_pairs = _split_merges(merges)
    elif is_gemma:
        merge_pairs = _merges_from_scores(tokens, range(0, -len(tokens), -1))
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelFileError(
                "GGUF SentencePiece tokenizer has no per-token scores and no merges."
            )
        merge_pairs = _merges_from_scores(tokens, scores)

    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if not isinstance(unk_id, int) or not 0 <= unk_id < len(tokens):
        unk_id = next((i for i, t in enumerate(token_types) if t == _TOKEN_TYPE_UNKNOWN), None)
    model = models.BPE(
        vocab=vocab,
        merges=merge_pairs,
        dropout=None,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = _BackendTokenizer(model)

    add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", not is_gemma)
    decoder_steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if is_gemma or not add_space_prefix:
        backend.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif architecture == "phi3":
        # Phi-3 prepends ▁ in the normalizer, which differs from Metaspace only on text that
        # starts with a space (transformers picks this by architecture too).
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
        )
        decoder_steps.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPIECE_SPACE, prepend_scheme="first", split=False
        )
        decoder_steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(decoder_steps)
    # The stored spelling: a respelled Gemma space run is then not found in the vocabulary and
    # is left to BPE, as in transformers.
    _add_gguf_added_tokens(backend, stored_tokens, token_types)
    return backend


def _add_gguf_added_tokens(
    backend: _BackendTokenizer, tokens: list[str], token_types: list[int]
) -> None:
    """Register control tokens as special and user-defined tokens as plain added tokens.

    Both are already in the vocabulary, so they keep their GGUF ids.
    """
    special = []
    user_defined = []
    for token, token_type in zip(tokens, token_types):
        if token_type == _TOKEN_TYPE_CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == _TOKEN_TYPE_USER_DEFINED and backend.token_to_id(token) is not None:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    if special:
        backend.add_special_tokens(special)
    if user_defined:
        backend.add_tokens(user_defined)


def _check_unique(vocab: Mapping[str, int], tokens: list[str]) -> None:
    if len(vocab) != len(tokens):
        seen: set[str] = set()
        duplicate = next(t for t in tokens if t in seen or seen.add(t))
        raise ModelFileError(f"GGUF vocabulary lists token {duplicate!r} more than once.")


def _read_json_if_present(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise ModelFileError(f"Cannot read {path}: {error}") from error


@lru_cache(maxsize=1)
def _chat_template_environment() -> Any:
    """The sandboxed Jinja environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False
    ) -> str:
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment
