"""S-MBU and S-MFU (MoE-CAP, arXiv 2412.07067) from the core's per-pass counters.

For pass p with wall time t_p, on hardware with peak bandwidth BW and peak FLOP/s F:

  S-MBU_p = bytes_p / t_p / BW        S-MFU_p = flops_p / t_p / F

Two definitions of bytes_p and flops_p, both from the same additive terms (``LLM.counters()``):

* ``compat`` (MoE-CAP's): weights of attention + routed experts hit + shared experts (a dense
  FFN counts as one expert hit by every token) + KV bytes; FLOPs of attention projections +
  top_k experts per token + shared experts + attention scores/values. Unlike the reference code,
  KV bytes are counted at the KV cache's dtype, top_k experts (not one) per token, attention
  FLOPs over each query's own context (not multiplied by the batch size).
* ``complete``: ``compat`` plus the embedding rows looked up, the LM head, the router and the
  norms (bytes and FLOPs), and the new K/V written.

KV bytes in both are ``kv_bytes_unique``: each sequence's attended K/V read once per layer, the
traffic of a kernel that reuses K/V across a chunk's query tokens (MoE-CAP's count). The engine's
own kernel re-reads them per query token (``kv_bytes_read``), which matters only in prefill.

Aggregates are given both ways: ``mean`` = mean over passes of the per-pass ratios (what
MoE-CAP reports) and ``total`` = sum of bytes (FLOPs) / sum of seconds / peak (the true
utilisation over the run; long passes weigh more).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from lmengine.bench.hardware import HardwareSpec

__all__ = [
    "DEFINITIONS",
    "per_pass",
    "aggregate",
    "compute_dtype_for",
]

_COMPAT_WEIGHTS = ["attn", "dense_ffn", "experts", "shared_experts"]
_COMPAT_FLOPS = ["attn_proj", "attn_scores", "dense_ffn", "experts", "shared_experts"]
DEFINITIONS = {
    "compat": {
        "weights": _COMPAT_WEIGHTS,
        "flops": _COMPAT_FLOPS,
        "kv": ["kv_bytes_unique"],
    },
    "complete": {
        "weights": _COMPAT_WEIGHTS + ["embed", "lm_head", "router", "norm"],
        "flops": _COMPAT_FLOPS + ["lm_head", "router", "norm"],
        "kv": ["kv_bytes_unique", "kv_bytes_written"],
    },
}

_QUANTIZED = ("q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q6_k")


def compute_dtype_for(records: pd.DataFrame | Iterable[dict]) -> str:
    """The dtype whose peak S-MFU divides by: 'int8' when most weight bytes are quantized (their
    products are 8-bit integer dot products), else 'fp32' (the CPU computes f16/bf16 in fp32)."""
    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if df.empty:
        return "fp32"
    quant = sum(df[c].sum() for c in (f"weight_bytes_dtype_{q}" for q in _QUANTIZED) if c in df)
    total = df[[c for c in df.columns if c.startswith("weight_bytes_dtype_")]].sum().sum()
    return "int8" if quant > total / 2 else "fp32"


def per_pass(
    records: pd.DataFrame | Iterable[dict], spec: HardwareSpec, compute_dtype: str | None = None
) -> pd.DataFrame:
    """The records with bytes/FLOPs per definition and S-MBU / S-MFU columns added:
    ``bytes_<def>``, ``flops_<def>``, ``s_mbu_<def>``, ``s_mfu_<def>`` for def in compat,
    complete; plus ``e_act`` (distinct experts hit, averaged over MoE layers; NaN if dense)."""
    df = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if df.empty:
        return df
    dtype = compute_dtype or compute_dtype_for(df)
    peak_flops = spec.peak_for(dtype)
    secs = df["seconds"].clip(lower=1e-12)
    for name, d in DEFINITIONS.items():
        nbytes = sum(df[f"weight_bytes_{w}"] for w in d["weights"]) + sum(df[k] for k in d["kv"])
        flops = sum(df[f"flops_{f}"] for f in d["flops"])
        df[f"bytes_{name}"] = nbytes
        df[f"flops_{name}"] = flops
        df[f"s_mbu_{name}"] = nbytes / secs / spec.bandwidth
        df[f"s_mfu_{name}"] = flops / secs / peak_flops
    df["e_act"] = (df["experts_active_sum"] / df["moe_layers"]).where(df["moe_layers"] > 0)
    df["compute_dtype"] = dtype
    return df


def aggregate(df: pd.DataFrame, spec: HardwareSpec, by: str | None = "mode") -> pd.DataFrame:
    """One row per group (per pass mode by default, plus 'all'): passes, tokens, seconds and for
    each metric and definition the ``_mean`` (mean of per-pass ratios) and ``_total``
    (Σ/Σtime) aggregate. ``df`` is the output of per_pass()."""
    if df.empty:
        return pd.DataFrame()
    dtype = df["compute_dtype"].iloc[0]
    peak_flops = spec.peak_for(dtype)
    groups = [("all", df)]
    if by is not None:
        groups += [(str(k), g) for k, g in df.groupby(by, sort=True)]
    rows = []
    for key, g in groups:
        secs = g["seconds"].sum()
        row = {
            by or "group": key,
            "passes": len(g),
            "tokens": int(g["n_tokens"].sum()),
            "seconds": secs,
            "compute_dtype": dtype,
        }
        for name in DEFINITIONS:
            row[f"s_mbu_{name}_mean"] = g[f"s_mbu_{name}"].mean()
            row[f"s_mbu_{name}_total"] = g[f"bytes_{name}"].sum() / secs / spec.bandwidth
            row[f"s_mfu_{name}_mean"] = g[f"s_mfu_{name}"].mean()
            row[f"s_mfu_{name}_total"] = g[f"flops_{name}"].sum() / secs / peak_flops
        row["e_act_mean"] = g["e_act"].mean()
        rows.append(row)
    return pd.DataFrame(rows)
