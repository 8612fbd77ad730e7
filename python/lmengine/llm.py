"""The offline engine: ``LLM`` loads a model and runs batched generation on the C++ core.

Requests are scheduled onto the core's batched steps: every step carries one decode token for
each running sequence plus prompt chunks of newly admitted ones (chunked prefill) up to a token
budget, so many prompts of different lengths share each pass over the weights. A request is
admitted only when the KV pool can hold its whole prompt + max_tokens, so generation never runs
out of pages midway.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmengine import _core
from lmengine.errors import (
    ContextLengthError,
    InvalidRequestError,
    KVCacheFullError,
)
from lmengine.models.loader import LoadedCheckpoint, load_checkpoint
from lmengine.resa import ReSAConfig, ReSACycle, check_attention_mode, decode_teacher_forced
from lmengine.sampling import Sampler, SamplingParams, StopChecker, end_of_request
from lmengine.tokenizer import Tokenizer

__all__ = ["LLM", "RequestOutput"]


@dataclass
class RequestOutput:
    """One finished request."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None  # per generated token, under the raw model distribution
    top_logprobs: list[list[tuple[int, float]]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Request:
    index: int
    prompt: str | None
    prompt_ids: np.ndarray
    params: SamplingParams
    sampler: Sampler
    stops: StopChecker
    detok: Any
    max_new: int
    seq: int = -1
    n_prefilled: int = 0
    reserved_pages: int = 0
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    t_start: float = 0.0
    t_first: float = 0.0
    cycle: ReSACycle | None = None


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class LLM:
    """A loaded model ready to generate.

    ``model`` is a registry name (see ``lmengine list``), a ``.gguf`` file, or an HF-style
    directory (config.json + *.safetensors + tokenizer.json). The KV cache pool is sized by
    ``kv_cache_tokens`` (positions across all sequences) or ``kv_cache_memory`` (bytes).
    ``activation_bits=16`` (default) feeds quantized products 16-bit activation blocks (Q4_0,
    Q4_1, Q5_0, Q8_0 weights; K-quants get an 8-bit row plus its 8-bit rounding residual), which
    keeps logits within ~1e-4 of the logit range of an fp32 reference at the speed of 8-bit rows;
    ``8`` is a single 8-bit row as llama.cpp does: ~1-3% logit error. Prompt chunks of >= 8
    tokens use fp32 activations either way.
    ``attention="sparse"|"resa"`` decodes block-sparsely (``resa``: with periodic dense
    rectification), configured by ``resa=ReSAConfig(...)``; see ``lmengine.resa``. Its block is
    the KV page: ``page_size`` defaults to ``resa.block_size`` and must equal it.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        n_threads: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_memory: int | None = None,
        kv_dtype: str = "f32",
        page_size: int | None = None,
        max_context: int | None = None,
        max_step_tokens: int = 512,
        activation_bits: int = 16,
        attention: str = "dense",
        resa: ReSAConfig | None = None,
    ):
        from lmengine.registry import resolve_model

        t0 = time.perf_counter()
        self.attention = check_attention_mode(attention)
        if resa is not None and not isinstance(resa, ReSAConfig):
            raise InvalidRequestError(f"resa must be a ReSAConfig, got {type(resa).__name__}")
        self.resa = ReSAConfig() if resa is None else resa
        sparse_capable = self._sparse_capable = self.attention != "dense"
        if page_size is None:
            page_size = self.resa.block_size if sparse_capable else 16
        elif sparse_capable and page_size != self.resa.block_size:
            raise InvalidRequestError(
                f"ReSAConfig.block_size ({self.resa.block_size}) must equal page_size "
                f"({page_size}): a sparse-attention block is one KV page"
            )
        self.checkpoint: LoadedCheckpoint = load_checkpoint(resolve_model(model))
        self.spec = self.checkpoint.spec
        self._tokenizer: Tokenizer | None = None
        context = self.spec.max_context if max_context is None else int(max_context)
        if context <= 0:
            raise InvalidRequestError(f"max_context must be positive, got {max_context}")
        self.max_context = min(context, self.spec.max_context) if max_context is None else context
        if max_step_tokens < 1:
            raise InvalidRequestError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        self.max_step_tokens = int(max_step_tokens)
        kv_elem = {"f32": 4, "f16": 2, "bf16": 2}.get(kv_dtype)
        if kv_elem is None:
            raise InvalidRequestError(f"kv_dtype must be 'f32', 'f16' or 'bf16', got {kv_dtype!r}")
        bytes_per_token = (
            2 * self.spec.n_layers * self.spec.n_kv_heads * self.spec.head_dim * kv_elem
        )
        if sparse_capable:  # key min/max per page in the KV dtype: 2 * head_dim per page_size
            bytes_per_token += (
                2
                * self.spec.n_layers
                * self.spec.n_kv_heads
                * self.spec.head_dim
                * kv_elem
                / page_size
            )
        if kv_cache_tokens is not None and kv_cache_memory is not None:
            raise InvalidRequestError("give kv_cache_tokens or kv_cache_memory, not both")
        if kv_cache_memory is not None:
            kv_cache_tokens = int(int(kv_cache_memory) // bytes_per_token)
        if kv_cache_tokens is None:
            kv_cache_tokens = min(self.max_context, 8192)
        if kv_cache_tokens < page_size:
            raise InvalidRequestError(
                f"KV cache of {kv_cache_tokens} tokens is smaller than one page ({page_size})"
            )
        self.kv_cache_bytes = int(-(-kv_cache_tokens // page_size) * page_size * bytes_per_token)
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if self.kv_cache_bytes > physical:
            raise KVCacheFullError(
                f"a KV cache of {kv_cache_tokens} tokens needs {self.kv_cache_bytes / 2**30:.1f} GiB, "
                f"more than this machine's {physical / 2**30:.1f} GiB; lower kv_cache_tokens"
            )
        if activation_bits not in (8, 16):
            raise InvalidRequestError(f"activation_bits must be 8 or 16, got {activation_bits}")
        core_config = self.spec.core_config(self.max_context)
        core_config["activation_bits"] = int(activation_bits)
        self._engine = _core.Engine(
            core_config,
            self.checkpoint.tensors,
            kv_pages=-(-int(kv_cache_tokens) // page_size),
            page_size=page_size,
            kv_dtype=kv_dtype,
            n_threads=int(n_threads or _default_threads()),
            block_summaries=sparse_capable,
        )
        if sparse_capable:
            self.resa.apply(self._engine)
        self.load_seconds = time.perf_counter() - t0

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, built on first use (logits() and id-level calls never need it)."""
        if self._tokenizer is None:
            ckpt = self.checkpoint
            if ckpt.format == "gguf":
                self._tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata)
            else:
                self._tokenizer = Tokenizer.from_file(ckpt.tokenizer_dir)
        return self._tokenizer

    # -- public API ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def n_threads(self) -> int:
        return self._engine.n_threads

    def set_attention(self, attention: str, resa: ReSAConfig | None = None) -> None:
        """Switches the decode attention of later requests. An LLM built with ``attention="dense"``
        keeps no block summaries, so it cannot switch to a sparse mode; one built sparse can run
        any mode (dense included) and change its ``ReSAConfig`` (same ``block_size``)."""
        check_attention_mode(attention)
        resa = self.resa if resa is None else resa
        if not isinstance(resa, ReSAConfig):
            raise InvalidRequestError(f"resa must be a ReSAConfig, got {type(resa).__name__}")
        if not self._sparse_capable:
            if attention == "dense":
                return
            raise InvalidRequestError(
                "this LLM was built with attention='dense' (no block summaries); "
                "build it with attention='sparse' or 'resa'"
            )
        if resa.block_size != self._engine.page_size:
            raise InvalidRequestError(
                f"ReSAConfig.block_size ({resa.block_size}) must equal the page size "
                f"({self._engine.page_size})"
            )
        resa.apply(self._engine)
        self.attention, self.resa = attention, resa

    def kv_cache_usage(self) -> dict[str, int]:
        total = self._engine.total_pages
        return {
            "total_pages": total,
            "free_pages": self._engine.free_pages,
            "page_size": self._engine.page_size,
            "active_sequences": self._engine.active_sequences,
        }

    def counters(self) -> list[dict[str, Any]]:
        """Per-forward-pass work records since the last ``reset_counters()``, oldest first.

        Each record is a flat dict (``pandas.DataFrame(llm.counters())`` gives one row per pass):
        mode, sequences, tokens, context attended, FLOPs and weight bytes per term, weight bytes
        per dtype, KV bytes read/written, wall seconds. ``lmengine.bench.cap_metrics`` turns them
        into S-MBU / S-MFU. The core keeps the last 4096 passes.
        """
        return self._engine.counters()["records"]

    def reset_counters(self) -> None:
        self._engine.reset_counters()

    def expert_stats(self, reset: bool = False) -> list[dict[str, int]]:
        """Tokens routed to each expert of each MoE layer since the last reset, as records
        ``{layer, expert, tokens}`` (``pandas.DataFrame(records)`` takes them); [] for a dense
        model. ``reset=True`` zeroes the counts after reading them."""
        from lmengine.models.moe import expert_count_records

        records = []
        if self.spec.moe is not None:
            records = expert_count_records(self._engine.expert_counts(), self.spec.moe.moe_layers)
        if reset:
            self._engine.reset_expert_counts()
        return records

    def generate(
        self,
        prompts: str | Sequence[str],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for each prompt (batched); returns outputs in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        for p in prompts:
            if not isinstance(p, str):
                raise InvalidRequestError(f"prompts must be strings, got {type(p).__name__}")
        ids = [self.tokenizer.encode(p) for p in prompts]
        return self._generate_batch(prompts, ids, params)

    def generate_ids(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> RequestOutput:
        """Generates from token ids (no tokenization of the prompt)."""
        return self._generate_batch([None], [list(prompt_token_ids)], params)[0]

    def generate_batch_ids(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        return self._generate_batch(
            [None] * len(prompt_token_ids), [list(p) for p in prompt_token_ids], params
        )

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text pieces as they are generated (stop strings never leak into them)."""
        reqs = self._make_requests([prompt], [self.tokenizer.encode(prompt)], params)
        for _, piece, _ in self._run(reqs):
            if piece:
                yield piece

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        params: SamplingParams | None = None,
        **template_kwargs: Any,
    ) -> RequestOutput | list[RequestOutput]:
        """Applies the model's chat template and generates the assistant's reply.

        One conversation (a list of messages) gives one output; a list of conversations gives a
        list of outputs, generated as one batch.
        """
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        texts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, **template_kwargs)
            for c in convs
        ]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        outs = self._generate_batch(texts, ids, params)
        return outs[0] if single else outs

    def logits(self, token_ids: Sequence[int], prefill: int | None = None) -> np.ndarray:
        """Logits at every position, float32 ``[len(token_ids), vocab]``.

        The first ``prefill`` tokens (default: all) go through one prefill step; each later
        token is fed alone through the decode path, exactly as generation feeds it (sparse and
        rectified as the LLM's ``attention`` mode says; a rectification step's row is the dense
        chunk's last row, as generation samples from it).
        """
        ids = self._check_ids(token_ids)
        n = len(ids)
        k = n if prefill is None else int(prefill)
        if not 0 <= k <= n:
            raise InvalidRequestError(f"prefill must be in [0, {n}], got {prefill}")
        if n > self.max_context:
            raise ContextLengthError(f"{n} tokens exceed the context of {self.max_context}")
        self._check_fits(n)
        seq = self._engine.seq_create()
        try:
            parts = []
            if k:
                parts.append(self._engine.step([seq], [ids[:k]], [True]))
            cycle = ReSACycle(self.attention, self.resa)
            parts += decode_teacher_forced(self._engine, seq, ids, k, cycle)
            return np.concatenate(parts, axis=0)
        finally:
            self._engine.seq_free(seq)

    # -- internals ----------------------------------------------------------------------------

    def _check_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(token_ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidRequestError("token ids must be a flat sequence of integers")
        if arr.size == 0:
            raise InvalidRequestError("empty prompt: at least one token is needed")
        bad = (arr < 0) | (arr >= self.spec.vocab_size)
        if bad.any():
            raise InvalidRequestError(
                f"token id {int(arr[bad][0])} out of range [0, {self.spec.vocab_size})"
            )
        return arr.astype(np.int32)

    def _pages_for(self, n_tokens: int) -> int:
        ps = self._engine.page_size
        return -(-n_tokens // ps)

    def _check_fits(self, n_tokens: int) -> None:
        need = self._pages_for(n_tokens)
        if need > self._engine.total_pages:
            raise KVCacheFullError(
                f"request needs {n_tokens} KV positions ({need} pages) but the pool holds "
                f"{self._engine.total_pages * self._engine.page_size}; raise kv_cache_tokens"
            )

    def _make_requests(self, prompts, ids_list, params) -> list[_Request]:
        if params is None:
            params_list = [SamplingParams()] * len(ids_list)
        elif isinstance(params, SamplingParams):
            params_list = [params] * len(ids_list)
        else:
            params_list = list(params)
            if len(params_list) != len(ids_list):
                raise InvalidRequestError("params must be one SamplingParams or one per prompt")
        reqs = []
        for i, (prompt, ids, sp) in enumerate(zip(prompts, ids_list, params_list)):
            if not isinstance(sp, SamplingParams):
                raise InvalidRequestError(f"params must be SamplingParams, got {type(sp).__name__}")
            arr = self._check_ids(ids)
            if len(arr) >= self.max_context:
                raise ContextLengthError(
                    f"prompt of {len(arr)} tokens does not fit the context of {self.max_context} "
                    f"(at least one position must be left to generate)"
                )
            max_new = min(sp.max_tokens, self.max_context - len(arr))
            self._check_fits(len(arr) + max_new)
            reqs.append(
                _Request(
                    index=i,
                    prompt=prompt,
                    prompt_ids=arr,
                    params=sp,
                    sampler=Sampler(sp, arr),
                    stops=StopChecker.from_params(sp),
                    detok=self.tokenizer.stream_decoder(),
                    max_new=max_new,
                )
            )
        return reqs

    def _generate_batch(self, prompts, ids_list, params) -> list[RequestOutput]:
        reqs = self._make_requests(prompts, ids_list, params)
        for _ in self._run(reqs):
            pass
        return [self._output(r) for r in reqs]

    def _output(self, r: _Request) -> RequestOutput:
        want_lp = r.params.logprobs is not None
        return RequestOutput(
            prompt=r.prompt,
            prompt_token_ids=r.prompt_ids.tolist(),
            text=r.stops.text,
            token_ids=list(r.out_ids),
            finish_reason=r.finish_reason or "length",
            stop_reason=r.stop_reason,
            logprobs=list(r.logprobs) if want_lp else None,
            top_logprobs=list(r.top_logprobs) if want_lp else None,
            metrics={
                "ttft_s": r.t_first - r.t_start,
                "total_s": time.perf_counter() - r.t_start,
                "prompt_tokens": float(len(r.prompt_ids)),
                "output_tokens": float(len(r.out_ids)),
            },
        )

    def _run(self, reqs: list[_Request]) -> Iterator[tuple[_Request, str, bool]]:
        """Drives requests to completion; yields (request, new text, finished) per token."""
        eng = self._engine
        pending = deque(reqs)
        running: list[_Request] = []
        reserved = 0
        try:
            while pending or running:
                # Admit in arrival order while the pool can hold each request's worst case.
                while pending:
                    r = pending[0]
                    need = self._pages_for(len(r.prompt_ids) + r.max_new)
                    if reserved + need > eng.total_pages:
                        break
                    pending.popleft()
                    r.seq = eng.seq_create()
                    r.cycle = ReSACycle(self.attention, self.resa)
                    r.reserved_pages = need
                    r.t_start = time.perf_counter()
                    reserved += need
                    running.append(r)
                if not running:
                    raise KVCacheFullError(
                        "the KV pool is held by other sequences; no request fits"
                    )
                seq_ids, chunks, wants, sparse, sampling = [], [], [], [], []
                budget = self.max_step_tokens
                for r in running:
                    if r.n_prefilled >= len(r.prompt_ids):
                        rewind, is_sparse = r.cycle.decode()
                        if rewind:  # rectification: re-run the last `rewind` decoded tokens
                            n_fed = len(r.prompt_ids) + len(r.out_ids) - 1
                            eng.seq_truncate(r.seq, n_fed - rewind)
                        seq_ids.append(r.seq)
                        chunks.append(np.array(r.out_ids[-1 - rewind :], dtype=np.int32))
                        wants.append(False)
                        sparse.append(is_sparse)
                        sampling.append(r)
                        budget -= 1 + rewind
                for r in running:
                    if r.n_prefilled < len(r.prompt_ids) and budget > 0:
                        n = min(budget, len(r.prompt_ids) - r.n_prefilled)
                        seq_ids.append(r.seq)
                        chunks.append(r.prompt_ids[r.n_prefilled : r.n_prefilled + n])
                        wants.append(False)
                        sparse.append(False)
                        r.n_prefilled += n
                        budget -= n
                        sampling.append(r if r.n_prefilled == len(r.prompt_ids) else None)
                logits = eng.step(seq_ids, chunks, wants, sparse)
                finished = []
                for row, r in enumerate(sampling):
                    if r is None:
                        continue
                    piece, done = self._advance(r, logits[row])
                    yield r, piece, done
                    if done:
                        finished.append(r)
                for r in finished:
                    running.remove(r)
                    eng.seq_free(r.seq)
                    r.seq = -1
                    reserved -= r.reserved_pages
        finally:
            for r in running:
                if r.seq >= 0:
                    eng.seq_free(r.seq)
                    r.seq = -1

    def _advance(self, r: _Request, logits_row: np.ndarray) -> tuple[str, bool]:
        """Samples one token for r, updates its text and stop state."""
        res = r.sampler.sample(logits_row)
        if not r.out_ids:
            r.t_first = time.perf_counter()
        tok = res.token_id
        r.out_ids.append(tok)
        if r.params.logprobs is not None:
            r.logprobs.append(res.logprob)
            r.top_logprobs.append(res.top_logprobs or [])
        reason, text, stop_reason = end_of_request(
            tok, r.params, self.tokenizer.eos_token_ids, r.stops, r.detok, len(r.out_ids), r.max_new
        )
        if reason is not None:
            r.finish_reason, r.stop_reason = reason, stop_reason
        return text, reason is not None
