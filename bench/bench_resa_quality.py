"""Quality of block-sparse decoding against dense decoding: "sparse" vs "resa" over keep and f.

Question: teacher-forcing real English text through the decode path after a long prompt, how far
do "sparse" (block selection, no rectification) and "resa" (selection + a dense re-run of the last
f tokens every f tokens) move the next-token distribution away from dense attention, and how many
KV bytes do they read for it?

Method
- Text: the license texts of /usr/share/common-licenses (the tests' english_text), tokenized by
  the model's tokenizer; the first --prefill tokens are one dense prefill, the next --decode
  tokens are fed one at a time exactly as generation feeds them (``LLM.logits(ids, prefill=k)``),
  a rectification step's row being the last row of its dense chunk.
- One prefill serves every configuration (``lmengine.resa.logits_by_mode``: the sequence is
  truncated back to the prompt between configurations; decoding writes only later positions).
- Per configuration: mean over the decoded positions of KL(dense || method) in nats, and top-1
  agreement with dense (same argmax).
- KV read: bytes the sparse decode tokens' attention read (kept K/V blocks + every candidate's
  min/max summary), from the engine's counters, over what dense attention reads for the same
  tokens ("measured"); beside it the cost model KV x (1/b + keep + 1/f), which amortizes the
  rectification chunk (f tokens re-run densely every f) and counts fp32 summaries as 1/b of
  KV ("model"; for "sparse" without the 1/f term). The measured fraction leaves out the
  rectification chunks, which read the KV once per token of the chunk in today's dense path.

Usage: python bench/bench_resa_quality.py [--model PATH] [--prefill 6144] [--decode 256]
       [--threads 2]. Results: a table on stdout, JSON and CSV in bench/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LICENSES = Path("/usr/share/common-licenses")
LICENSE_NAMES = [
    "Apache-2.0",
    "GPL-3",
    "LGPL-3",
    "MPL-2.0",
    "Artistic",
    "BSD",
    "GFDL-1.3",
    "CC0-1.0",
]
KEEPS = (0.05, 0.1, 0.2)
RECTIFY = (16, 32, 64)


def english_text() -> str:
    parts = [(LICENSES / n).read_text(errors="ignore") for n in LICENSE_NAMES]
    return "\n\n".join(p for p in parts if p)


def kl_and_top1(dense: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    la, lb = log_softmax(dense), log_softmax(other)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return float(kl.mean()), float((dense.argmax(-1) == other.argmax(-1)).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prefill", type=int, default=6144)
    parser.add_argument("--decode", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-min", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "resa_quality"))
    args = parser.parse_args()

    try:
        import lmengine  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "python"))
    from lmengine import LLM, ReSAConfig
    from lmengine.resa import logits_by_mode

    n = args.prefill + args.decode
    llm = LLM(
        args.model,
        n_threads=args.threads,
        kv_cache_tokens=n + 64,
        max_context=max(n + 64, 8192),
        attention="resa",
    )
    ids = llm.tokenizer.encode(english_text())
    if len(ids) < n:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than prefill + decode = {n}")
    ids = ids[:n]

    configs = [("dense", None, None)]
    configs += [("sparse", keep, None) for keep in KEEPS]
    configs += [("resa", keep, f) for keep in KEEPS for f in RECTIFY]
    modes = [
        (mode, ReSAConfig(keep=keep or 0.1, n_min=args.n_min, rectify_every=f or 32))
        for mode, keep, f in configs
    ]
    # Validate first, on a short prefix: the shared-prefill path gives LLM.logits's rows.
    short = ids[:300]
    for attention, cfg in (modes[0], modes[4]):  # dense; resa keep 0.05, f 16
        llm.set_attention(attention, cfg)
        check = llm.logits(short, prefill=270)[270:]
        first = logits_by_mode(llm, short, 270, [(attention, cfg)])[0]
        assert np.array_equal(check, first), f"shared-prefill path differs for {attention}"

    rows = []
    t0 = time.perf_counter()
    stats: list[dict] = []
    all_logits = logits_by_mode(llm, ids, args.prefill, modes, stats)
    dense = all_logits[0]
    for (mode, keep, f), logits, st in zip(configs, all_logits, stats):
        kl, top1 = kl_and_top1(dense, logits)
        measured = st["kv_bytes_read"] / st["kv_bytes_dense"] if st["kv_bytes_dense"] else 1.0
        model = 1.0 if mode == "dense" else 1 / 16 + keep + (1 / f if f else 0.0)
        rows.append(
            {
                "mode": mode,
                "keep": keep,
                "rectify_every": f,
                "mean_kl": kl,
                "top1_agreement": top1,
                "kv_read_measured": measured,
                "kv_read_model": model,
                "decode_seconds": st["seconds"],
            }
        )
    total = time.perf_counter() - t0

    print(
        f"\nReSA quality: {args.model}, prefill {args.prefill} tokens of English text, "
        f"{args.decode} teacher-forced decode positions, n_min {args.n_min}, block 16"
    )
    print(
        f"{'mode':<7} {'keep':>5} {'f':>4} {'mean KL':>9} {'top-1':>7} "
        f"{'KV read':>8} {'model':>7} {'decode s':>9}"
    )
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:.2f}"
        f = "-" if r["rectify_every"] is None else str(r["rectify_every"])
        print(
            f"{r['mode']:<7} {keep:>5} {f:>4} {r['mean_kl']:>9.4f} {r['top1_agreement']:>7.3f} "
            f"{r['kv_read_measured']:>8.3f} {r['kv_read_model']:>7.3f} {r['decode_seconds']:>9.1f}"
        )
    print(f"(total {total:.0f} s; KV read = sparse tokens' attention bytes / dense's, measured)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": args.model,
        "prefill": args.prefill,
        "decode": args.decode,
        "threads": args.threads,
        "n_min": args.n_min,
        "rows": rows,
    }
    Path(f"{out}.json").write_text(json.dumps(payload, indent=2))
    with open(f"{out}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}.json and {out}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
