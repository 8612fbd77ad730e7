"""``lmengine profile``: where a long-context decode step's time goes.

Fills `batch` sequences with `--context` positions, decodes `--steps` tokens in each, and reads
the engine's per-op wall times (``Engine.op_seconds()``, reset around every step) into
- a per-step breakdown grouped as selection, sparse attention, rectification, dense attention,
  MLP and other, with the KV bytes a dense step reads beside it;
- ``profile_summary.json`` (the numbers) and ``profile_trace.json`` (Chrome trace-event format:
  one event per op kind per step, opens in chrome://tracing or https://ui.perfetto.dev).

Filling: a real prefill of English text (short contexts), or K/V imported through
``Engine.seq_write_kv`` (long contexts, which a CPU would take many minutes to prefill): each
layer's keys and values are drawn from normal distributions with the per-(layer, head, dim)
mean and spread measured on a short real prefill, so their scale is the model's own.

The op kinds are read from the engine, so kinds added later (sparse selection, sparse
attention) appear without changes here; names are grouped by the words they contain.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmengine.errors import InvalidRequestError

GROUPS = ("selection", "sparse attention", "rectification", "dense attention", "MLP", "other")
_NON_OP_KEYS = ("steps", "tokens")


def op_group(name: str) -> str:
    """The breakdown group of one engine op kind, by name."""
    n = name.lower()
    if "rectif" in n:
        return "rectification"
    if "select" in n or "summar" in n:
        return "selection"
    if "sparse" in n:
        return "sparse attention"
    if n == "attention" or "dense" in n and "attention" in n:
        return "dense attention"
    if n in ("matmul_ffn", "activation") or "ffn" in n or "mlp" in n:
        return "MLP"
    return "other"


def op_kinds(op_seconds: dict[str, Any]) -> list[str]:
    """The op-kind names of an ``op_seconds()`` dict (counters such as steps/tokens/bytes left out)."""
    return [k for k in op_seconds if k not in _NON_OP_KEYS and "bytes" not in k]


def supported_attention_modes() -> tuple[str, ...]:
    """Attention modes this build's ``LLM`` accepts ("dense" always)."""
    from lmengine.llm import LLM

    param = inspect.signature(LLM.__init__).parameters.get("attention")
    if param is None:
        return ("dense",)
    modes = getattr(sys.modules[LLM.__module__], "ATTENTION_MODES", None)
    return tuple(modes) if modes else ("dense", "sparse", "resa")


def llm_attention_kwargs(attention: str) -> dict[str, Any]:
    """Keyword arguments selecting `attention` in LLM(...); raises if this build lacks it."""
    from lmengine.llm import LLM

    if "attention" in inspect.signature(LLM.__init__).parameters:
        return {"attention": attention}
    if attention != "dense":
        raise InvalidRequestError(
            f"attention={attention!r} is not supported by this build's LLM (only 'dense')"
        )
    return {}


def english_ids(llm, n: int) -> np.ndarray:
    """n token ids of English text (the OS's license texts, repeated if short)."""
    texts, chars = [], 0
    for p in sorted(Path("/usr/share/common-licenses").glob("*")):
        if p.is_file() and chars < 6 * n:  # ~4-5 characters per token: tokenize no more
            texts.append(p.read_text(errors="ignore"))
            chars += len(texts[-1])
    text = "\n".join(texts) or "The quick brown fox jumps over the lazy dog. " * 400
    ids = llm.tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return np.asarray(ids[:n], dtype=np.int32)


def kv_statistics(
    llm, n_tokens: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of K and V per (layer, KV head, dim) over a short real prefill."""
    eng, spec = llm._engine, llm.spec
    n_tokens = min(n_tokens, llm.max_context)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, n_tokens).astype(np.int32)
    try:
        ids = english_ids(llm, n_tokens)
    except Exception:  # a model without a usable tokenizer: random ids still give the scale
        pass
    seq = eng.seq_create()
    try:
        eng.step([seq], [ids], [False])
        kv = [eng.seq_read_kv(seq, layer, 0, n_tokens) for layer in range(spec.n_layers)]
    finally:
        eng.seq_free(seq)
    k = np.stack([a for a, _ in kv])  # (layers, n, heads, dim)
    v = np.stack([b for _, b in kv])
    return k.mean(axis=1), k.std(axis=1), v.mean(axis=1), v.std(axis=1)


def import_random_context(llm, seq: int, n_positions: int, stats, seed: int = 0, chunk: int = 2048):
    """Writes n_positions of K/V drawn with the model's statistics into sequence `seq`."""
    k_mean, k_std, v_mean, v_std = stats
    rng = np.random.default_rng(seed)
    eng = llm._engine
    for p0 in range(0, n_positions, chunk):
        n = min(chunk, n_positions - p0)
        shape = (k_mean.shape[0], n) + k_mean.shape[1:]
        z = rng.standard_normal(shape, dtype=np.float32)
        k = (k_mean[:, None] + k_std[:, None] * z).astype(np.float32)
        z = rng.standard_normal(shape, dtype=np.float32)
        v = (v_mean[:, None] + v_std[:, None] * z).astype(np.float32)
        eng.seq_write_kv(seq, p0, k, v)


def fill_sequences(llm, batch: int, context: int, fill: str) -> list[int]:
    """Creates `batch` sequences holding `context` positions each (fill: prefill or import)."""
    eng = llm._engine
    seqs = [eng.seq_create() for _ in range(batch)]
    if fill == "prefill":
        ids = english_ids(llm, context)
        for i in range(0, context, llm.max_step_tokens):
            part = ids[i : i + llm.max_step_tokens]
            eng.step(seqs, [part] * batch, [False] * batch)
    else:
        stats = kv_statistics(llm)
        for b, seq in enumerate(seqs):
            import_random_context(llm, seq, context, stats, seed=b)
    return seqs


def kv_bytes_per_token(llm, kv_dtype: str) -> int:
    elem = {"f32": 4, "f16": 2, "bf16": 2}[kv_dtype]
    return 2 * llm.spec.n_layers * llm.spec.n_kv_heads * llm.spec.head_dim * elem


def decode_steps(llm, seqs: list[int], n_steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """Runs n_steps decode steps (one new token per sequence; with attention="resa" a sequence
    due for rectification feeds its last f tokens again with it, as generation does) and returns
    each step's record: wall seconds, tokens the engine ran, and seconds per op kind."""
    from lmengine.resa import ReSACycle

    eng = llm._engine
    rng = np.random.default_rng(seed)
    attention = getattr(llm, "attention", "dense")
    cycles = [ReSACycle(attention, getattr(llm, "resa", None)) for _ in seqs]
    fed: list[list[int]] = [[] for _ in seqs]
    records = []
    for _ in range(n_steps):
        toks, sparse = [], []
        for i, seq in enumerate(seqs):
            new = int(rng.integers(0, llm.spec.vocab_size))
            rewind, is_sparse = cycles[i].decode()
            if rewind:
                eng.seq_truncate(seq, eng.seq_length(seq) - rewind)
            toks.append(np.asarray(fed[i][len(fed[i]) - rewind :] + [new], dtype=np.int32))
            fed[i].append(new)
            sparse.append(is_sparse)
        extra = (sparse,) if attention != "dense" else ()
        eng.reset_op_seconds()
        t0 = time.perf_counter()
        eng.step(seqs, toks, [False] * len(seqs), *extra)
        wall = time.perf_counter() - t0
        ops = eng.op_seconds()
        records.append(
            {
                "t_start": t0,
                "wall_s": wall,
                "tokens": int(ops.get("tokens", len(seqs))),
                "ops": {k: float(ops[k]) for k in op_kinds(ops)},
                "counters": {k: ops[k] for k in ops if "bytes" in k},
            }
        )
    return records


def summarize(records: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Per-step mean seconds per op and per group. A step that ran more tokens than the batch's
    decode tokens carried a rectification chunk: its time beyond the median plain step counts
    as rectification, the rest is split over its ops in proportion."""
    plain = [r["wall_s"] for r in records if r["tokens"] <= batch] or [r["wall_s"] for r in records]
    typical = float(np.median(plain))
    kinds = list(records[0]["ops"])
    per_op = dict.fromkeys(kinds, 0.0)
    groups = dict.fromkeys(GROUPS, 0.0)
    n_rect = 0
    for r in records:
        total = sum(r["ops"].values()) or 1e-30
        keep = 1.0
        if r["tokens"] > batch:
            n_rect += 1
            extra = max(0.0, r["wall_s"] - typical)
            groups["rectification"] += extra
            keep = max(0.0, 1.0 - extra / total)
        for k, sec in r["ops"].items():
            per_op[k] += sec
            groups[op_group(k)] += sec * keep
    n = len(records)
    return {
        "steps": n,
        "rectification_steps": n_rect,
        "step_s_mean": float(np.mean([r["wall_s"] for r in records])),
        "step_s_median": float(np.median([r["wall_s"] for r in records])),
        "op_s_per_step": {k: v / n for k, v in per_op.items()},
        "group_s_per_step": {k: v / n for k, v in groups.items()},
    }


def chrome_trace(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Trace-event JSON: per step one enclosing event and one event per op kind, laid end to end
    in the engine's op order within the step (op_seconds sums each kind over the step)."""
    t_origin = records[0]["t_start"]
    events = [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "lmengine"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "decode steps"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": "ops"}},
    ]
    for i, r in enumerate(records):
        ts = (r["t_start"] - t_origin) * 1e6
        events.append(
            {
                "name": f"step {i}",
                "cat": "step",
                "ph": "X",
                "ts": ts,
                "dur": r["wall_s"] * 1e6,
                "pid": 0,
                "tid": 0,
                "args": {"tokens": r["tokens"]},
            }
        )
        t = ts
        for k, sec in r["ops"].items():
            events.append(
                {
                    "name": k,
                    "cat": op_group(k),
                    "ph": "X",
                    "ts": t,
                    "dur": sec * 1e6,
                    "pid": 0,
                    "tid": 1,
                    "args": {"step": i, "group": op_group(k)},
                }
            )
            t += sec * 1e6
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}


def cost_model_fraction(llm) -> float | None:
    """KV bytes read per step relative to dense, from ReSA's cost model 1/b + keep + 1/f, when
    the loaded LLM carries a ReSA-style config (None for dense)."""
    attention = getattr(llm, "attention", "dense")
    cfg = getattr(llm, "resa", None) or getattr(llm, "resa_config", None)
    if attention == "dense" or cfg is None:
        return None
    b = getattr(cfg, "block_size", 16)
    keep = getattr(cfg, "keep", 0.1)
    f = getattr(cfg, "rectify_every", 32)
    return 1.0 / b + keep + (1.0 / f if attention == "resa" else 0.0)


def run_profile(args: argparse.Namespace) -> int:
    from lmengine.llm import LLM

    if args.context < 1 or args.steps < 1 or args.batch < 1:
        raise InvalidRequestError("--context, --steps and --batch must be >= 1")
    out = Path(args.out)
    try:  # before the run, so a bad --out does not cost the measurement
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequestError(f"--out {str(out)!r} is not a usable directory: {e}") from e
    fill = args.fill
    if fill == "auto":
        fill = "prefill" if args.context <= 2048 else "import"
    kw = llm_attention_kwargs(args.attention)
    if args.attention == "resa":
        # Whole cycles (f sparse steps, then the step that re-runs them): otherwise the timed
        # steps may hold no rectification and the breakdown would leave its cost out.
        from lmengine.resa import ReSAConfig, whole_cycles

        rounded = whole_cycles(args.steps, ReSAConfig())  # the LLM below runs the default config
        if rounded != args.steps:
            print(f"[lmengine] resa: {args.steps} steps rounded up to {rounded} (whole cycles)")
            args.steps = rounded
    span = args.context + args.steps + 3  # + the warm-up steps
    llm = LLM(
        args.model,
        n_threads=args.threads,
        kv_cache_tokens=args.batch * (span + 16),
        kv_dtype=args.kv_dtype,
        max_context=span,
        **kw,
    )
    t0 = time.perf_counter()
    seqs = fill_sequences(llm, args.batch, args.context, fill)
    fill_s = time.perf_counter() - t0
    try:
        decode_steps(llm, seqs, min(2, args.steps))  # warm-up: scratch growth, thread wake-up
        records = decode_steps(llm, seqs, args.steps, seed=1)
    finally:
        for s in seqs:
            llm._engine.seq_free(s)

    summary = summarize(records, args.batch)
    per_tok = kv_bytes_per_token(llm, args.kv_dtype)
    ctx_mid = args.context + 2 + args.steps // 2
    dense_bytes = args.batch * ctx_mid * per_tok
    frac = cost_model_fraction(llm)
    counters = {
        k: float(np.mean([r["counters"][k] for r in records])) for k in records[0]["counters"]
    }
    summary.update(
        {
            "model": str(args.model),
            "attention": args.attention,
            "context": args.context,
            "batch": args.batch,
            "kv_dtype": args.kv_dtype,
            "threads": llm.n_threads,
            "fill": fill,
            "fill_s": fill_s,
            "tokens_per_s": args.batch / summary["step_s_median"],
            "kv_bytes_dense_per_step": dense_bytes,
            "kv_bytes_per_step_cost_model": None if frac is None else dense_bytes * frac,
            "engine_counters_per_step": counters,
        }
    )
    (out / "profile_summary.json").write_text(json.dumps(summary, indent=2))
    meta = {
        k: summary[k] for k in ("model", "attention", "context", "batch", "kv_dtype", "threads")
    }
    (out / "profile_trace.json").write_text(json.dumps(chrome_trace(records, meta)))

    step_ms = summary["step_s_median"] * 1e3
    print(
        f"\nlmengine profile: {args.model}, attention={args.attention}, context {args.context}, "
        f"batch {args.batch}, KV {args.kv_dtype}, {llm.n_threads} threads, {args.steps} steps "
        f"(filled by {fill} in {fill_s:.1f} s)"
    )
    print(f"step median {step_ms:.2f} ms, {summary['tokens_per_s']:.1f} tok/s")
    mean_total = sum(summary["group_s_per_step"].values()) or 1e-30
    print(f"{'group':<18} {'ms/step':>9} {'share':>7}")
    for g in GROUPS:
        sec = summary["group_s_per_step"][g]
        print(f"{g:<18} {sec * 1e3:9.3f} {100 * sec / mean_total:6.1f}%")
    print(f"{'op kind':<18} {'ms/step':>9}")
    for k, sec in summary["op_s_per_step"].items():
        print(f"{k:<18} {sec * 1e3:9.3f}")
    att = (
        summary["group_s_per_step"]["dense attention"]
        + summary["group_s_per_step"]["sparse attention"]
    )
    line = f"KV bytes per step: dense {dense_bytes / 1e6:.1f} MB"
    if att > 0:
        line += f" (dense attention time -> {dense_bytes / att / 1e9:.1f} GB/s if it read all)"
    if frac is not None:
        line += f"; cost model {frac:.3f} x dense = {dense_bytes * frac / 1e6:.1f} MB"
    for k, v in counters.items():
        line += f"; engine {k} {v / 1e6:.1f} MB"
    print(line)
    print(f"wrote {out / 'profile_summary.json'} and {out / 'profile_trace.json'}")
    return 0


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="per-op time breakdown of long-context decode steps")
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument(
        "--context", type=int, default=32768, help="positions per sequence before decoding"
    )
    p.add_argument(
        "--attention",
        default="dense",
        help="attention mode passed to LLM(attention=...): dense, or what the build supports",
    )
    p.add_argument("--steps", type=int, default=16, help="decode steps measured")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--kv-dtype", default="f16", choices=["f32", "f16", "bf16"])
    p.add_argument(
        "--fill",
        default="auto",
        choices=["auto", "prefill", "import"],
        help="prefill real text, or import K/V with the model's statistics (auto: prefill up to 2048)",
    )
    p.add_argument("--out", default="profile_out", help="directory for the JSON summary and trace")
    p.set_defaults(func=run_profile)
