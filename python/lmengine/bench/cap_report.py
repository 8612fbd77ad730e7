"""Files of a CAP run: runs.csv, passes.csv, summary.md, results.json, the CAP radar and the
S-MBU / S-MFU vs batch size plots (matplotlib, PNG and SVG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from lmengine.bench import accuracy as acc

__all__ = ["normalise_axis", "radar_scores", "write_report"]


def normalise_axis(values, higher_is_better: bool) -> np.ndarray:
    """MoE-CAP's radar scale: 20 + 80 (v - min) / (max - min), reversed when lower is better,
    so outward is better on every axis. All-equal (or one) values score 100."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.nanmin(v), np.nanmax(v)
    if not np.isfinite(hi - lo) or hi == lo:
        return np.full(v.shape, 100.0)
    t = (v - lo) / (hi - lo)
    return 20.0 + 80.0 * (t if higher_is_better else 1.0 - t)


def radar_scores(runs: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """Cost ($/Mtok, lower better), Accuracy (higher better), Performance (TPOT, lower better)
    per system at one batch size, on the [20, 100] scale."""
    sel = runs[runs["batch_size"] == batch_size].drop_duplicates("system").reset_index(drop=True)
    return pd.DataFrame(
        {
            "system": sel["system"],
            "Cost": normalise_axis(sel["cost_usd_per_mtok"], higher_is_better=False),
            "Accuracy": normalise_axis(sel["accuracy"], higher_is_better=True),
            "Performance": normalise_axis(sel["tpot_s"], higher_is_better=False),
        }
    )


def _plot_radar(scores: pd.DataFrame, batch_size: int, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = ["Cost", "Accuracy", "Performance"]
    angles = [math.pi / 2 + 2 * math.pi * i / len(axes) for i in range(len(axes))]
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="polar")
    for _, row in scores.iterrows():
        vals = [row[a] for a in axes]
        ax.plot(angles + angles[:1], vals + vals[:1], linewidth=2, label=row["system"])
        ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.12)
    ax.set_xticks(angles)
    ax.set_xticklabels(axes, fontsize=12)
    ax.set_ylim(0, 100)
    ax.set_yticks([20, 40, 60, 80, 100])
    ax.set_title(f"CAP radar (batch {batch_size}; outward is better)", pad=20)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize=8)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def _plot_vs_batch(runs: pd.DataFrame, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    measured = runs[runs["kind"] == "lmengine"] if "kind" in runs else runs
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (system, g) in enumerate(measured.groupby("system", sort=False)):
        g = g.sort_values("batch_size")
        c = colors[i % len(colors)]
        b = g["batch_size"]
        a1.plot(b, g["decode_s_mbu_compat_mean"], "o-", color=c, label=f"{system} (MoE-CAP)")
        a1.plot(
            b, g["decode_s_mbu_complete_total"], "s--", color=c, label=f"{system} (complete, Σ/Σt)"
        )
        a2.plot(b, g["prefill_s_mfu_compat_mean"], "o-", color=c, label=f"{system} prefill")
        a2.plot(b, g["decode_s_mfu_compat_mean"], "s--", color=c, label=f"{system} decode")
    a1.set(xlabel="batch size", ylabel="S-MBU (decode passes)", title="S-MBU vs batch size")
    a2.set(xlabel="batch size", ylabel="S-MFU (MoE-CAP definition)", title="S-MFU vs batch size")
    sizes = sorted(set(runs["batch_size"]))
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(sizes, [str(x) for x in sizes])
        a.set_ylim(bottom=0)
        a.grid(True, alpha=0.3)
        if measured.size:
            a.legend(fontsize=7)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def _markdown(results: dict, scores: pd.DataFrame, radar_batch: int, files: dict) -> str:
    runs: pd.DataFrame = results["runs"]
    hw = results["hardware"]
    w = results["workload"]
    cost = results["cost"]
    lines = [
        "# CAP report",
        "",
        f"model `{results['model']}`, {results['threads']} threads; hardware **{hw.name}**: "
        f"bandwidth {hw.bandwidth / 1e9:.1f} GB/s, peaks "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in hw.peak_flops.items())
        + f" ({hw.source})",
        "",
        "GPUs (NVML): "
        + (
            ", ".join(f"{g['name']} (spec row {g['spec']})" for g in results["gpus"])
            if results["gpus"]
            else "none seen, GPU telemetry skipped"
        ),
        "",
        f"workload: batch sizes {w.batch_sizes}, {w.prompt_tokens} prompt tokens and "
        f"{w.output_tokens} output tokens per request (greedy, EOS ignored), all requests of a "
        "batch submitted together",
        "",
        "| system | batch | TTFT ms | TPOT ms | tok/s | S-MBU decode (MoE-CAP mean / complete Σ) "
        "| S-MFU prefill (MoE-CAP mean / complete Σ) | energy J | $/Mtok | accuracy | perplexity |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for _, r in runs.iterrows():
        energy = _fmt(r["energy_j"], ".1f") if r["energy_j"] == r["energy_j"] else "unknown"
        smbu = f"{_fmt(r.get('decode_s_mbu_compat_mean'), '.3f')} / {_fmt(r.get('decode_s_mbu_complete_total'), '.3f')}"
        smfu = f"{_fmt(r.get('prefill_s_mfu_compat_mean'), '.3f')} / {_fmt(r.get('prefill_s_mfu_complete_total'), '.3f')}"
        lines.append(
            f"| {r['system']} | {r['batch_size']} | {r['ttft_s'] * 1e3:.1f} | {r['tpot_s'] * 1e3:.1f} "
            f"| {r['throughput_tok_s']:.1f} | {smbu} | {smfu} | {energy} "
            f"| {r['cost_usd_per_mtok']:.3f} | {r['accuracy']:.3f} | {r['perplexity']:.2f} |"
        )
    ppl_def = acc.PPL_DEFINITION.format(windows=w.ppl_windows, window=w.ppl_window)
    util = runs.filter(regex=r"_s_m[bf]u_").to_numpy(dtype=float)
    if np.nanmax(util, initial=0.0) > 1.0:
        lines += [
            "",
            f"**Warning:** a utilisation above 1 ({np.nanmax(util):.2f}) means a peak was measured "
            "low (a busy machine during the probe); rerun with `--reprobe` on a quiet machine.",
        ]
    lines += [
        "",
        f"- accuracy: {acc.ARITH_DEFINITION} ({w.n_questions} questions, at most "
        f"{w.question_max_tokens} tokens each).",
        f"- {ppl_def}.",
        "- S-MBU = bytes / pass time / peak bandwidth, S-MFU = FLOPs / pass time / peak FLOP/s "
        f"({runs['compute_dtype'].dropna().iloc[0] if 'compute_dtype' in runs and runs['compute_dtype'].notna().any() else 'n/a'} peak), "
        "from the core's per-pass counters; MoE-CAP = attention + experts (dense FFN = one "
        "expert) + shared experts + KV at its own dtype, mean of per-pass ratios; complete = plus "
        "embeddings, LM head, router, norms and K/V written, Σbytes/Σtime. Peers expose no "
        "counters (n/a).",
        f"- cost: hardware ${cost.price_usd:,.0f} amortised over {cost.lifetime_years:g} years of "
        f"continuous use plus energy at ${cost.usd_per_kwh}/kWh; energy is measured (RAPL/NVML) "
        f"where readable, else estimated as {cost.tdp_w:.1f} W x wall time (energy_source column).",
        "",
        f"## CAP radar (batch {radar_batch})",
        "",
        "| system | Cost | Accuracy | Performance |",
        "|---|---:|---:|---:|",
    ]
    for _, s in scores.iterrows():
        lines.append(
            f"| {s['system']} | {s['Cost']:.0f} | {s['Accuracy']:.0f} | {s['Performance']:.0f} |"
        )
    lines += [
        "",
        "Axes on [20, 100], outward is better: accuracy 20 + 80 (v - min) / (max - min); cost "
        "($/Mtok) and performance (TPOT) the same formula reversed.",
        "",
        f"![CAP radar]({Path(files['radar_png']).name})",
        f"![S-MBU and S-MFU vs batch size]({Path(files['batch_png']).name})",
        "",
    ]
    for label, info in results["systems"].items():
        wrong = [a for a in info["answers"] if not a["correct"]][:3]
        if wrong:
            ex = "; ".join(
                f"{a['question']!r} -> {a['reply'].strip()[:40]!r} (want {a['answer']})"
                for a in wrong
            )
            lines.append(
                f"- {label} ({info['version']}, load {info['load_s']:.2f} s) misses e.g.: {ex}"
            )
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: Path) -> dict[str, str]:
    out_dir = Path(out_dir)
    runs: pd.DataFrame = results["runs"]
    files = {
        "runs_csv": out_dir / "runs.csv",
        "passes_csv": out_dir / "passes.csv",
        "summary_md": out_dir / "summary.md",
        "results_json": out_dir / "results.json",
    }
    runs.to_csv(files["runs_csv"], index=False)
    results["passes"].to_csv(files["passes_csv"], index=False)
    common = set.intersection(*(set(g["batch_size"]) for _, g in runs.groupby("system")))
    radar_batch = max(common) if common else int(runs["batch_size"].max())
    scores = radar_scores(runs, radar_batch)
    radar = _plot_radar(scores, radar_batch, out_dir / "cap_radar")
    batch = _plot_vs_batch(runs, out_dir / "smbu_smfu_vs_batch")
    files.update(radar_png=radar[0], radar_svg=radar[1], batch_png=batch[0], batch_svg=batch[1])
    files["summary_md"].write_text(_markdown(results, scores, radar_batch, files))
    hw = results["hardware"]
    payload = {
        "model": results["model"],
        "threads": results["threads"],
        "hardware": {k: v for k, v in hw.to_dict().items() if k != "extra"}
        | {"probe": hw.extra.get("probe")},
        "gpus": results["gpus"],
        "cost": vars(results["cost"]),
        "workload": vars(results["workload"]),
        "systems": results["systems"],
        "radar": scores.to_dict(orient="records"),
        "runs": runs.to_dict(orient="records"),
    }
    files["results_json"].write_text(json.dumps(payload, indent=2, default=str))
    return {k: str(v) for k, v in files.items()}
