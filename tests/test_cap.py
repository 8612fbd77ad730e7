"""S-MBU / S-MFU, the hardware table and probe, accuracy tasks and `lmengine bench cap`."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest

from lmengine.bench import accuracy as acc
from lmengine.bench import cap_metrics
from lmengine.bench.cap_report import normalise_axis
from lmengine.bench.cap_run import CostModel, parse_system, peer_python
from lmengine.bench.hardware import GPU_SPECS, HardwareSpec, cpu_spec, gpu_spec_for_name
from lmengine.bench.telemetry import EnergyMeter, gpu_devices
from lmengine.errors import InvalidRequestError


@pytest.fixture(scope="module")
def probe_home(tmp_path_factory):
    """A fresh LMENGINE_HOME holding only the CPU probe cache (the model stays where it is)."""
    home = tmp_path_factory.mktemp("lmhome")
    old = os.environ.get("LMENGINE_HOME")
    os.environ["LMENGINE_HOME"] = str(home)
    yield home
    if old is None:
        del os.environ["LMENGINE_HOME"]
    else:
        os.environ["LMENGINE_HOME"] = old


@pytest.fixture(scope="module")
def cpu_hw(probe_home) -> HardwareSpec:
    return cpu_spec(2)


def test_gpu_spec_table():
    for name in ("H100-SXM", "H200", "A100-SXM-80GB", "L40S", "B200", "MI300X"):
        s = GPU_SPECS[name]
        assert s.kind == "gpu" and s.price_usd > 0 and s.tdp_w > 0
        assert s.peak_flops["fp32"] < s.peak_flops["bf16"] <= s.peak_flops["int8"]
        assert s.peak_for("fp16") == s.peak_flops["fp16"]
    assert GPU_SPECS["H100-SXM"].bandwidth == 3.35e12
    assert GPU_SPECS["H200"].bandwidth == 4.8e12
    assert GPU_SPECS["A100-SXM-80GB"].bandwidth == 2.039e12
    # Dense, not 2:4-sparse: H100 SXM BF16 is 989 TFLOP/s (1979 with sparsity).
    assert GPU_SPECS["H100-SXM"].peak_flops["bf16"] == pytest.approx(989.4e12)
    assert (
        GPU_SPECS["A100-SXM-80GB"].peak_for("fp8") == GPU_SPECS["A100-SXM-80GB"].peak_flops["bf16"]
    )
    assert gpu_spec_for_name("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert gpu_spec_for_name("NVIDIA H200").name == "H200"
    assert gpu_spec_for_name("AMD Instinct MI300X").name == "MI300X"
    assert gpu_spec_for_name("GeForce GTX 1080") is None


def test_cpu_probe_is_cached(cpu_hw, probe_home):
    probe = cpu_hw.extra["probe"]
    assert probe["bandwidth"] > 0 and probe["fp32"] > 0 and probe["int8"] > 0
    files = list((probe_home / "hardware").glob("cpu-probe-*.json"))
    assert len(files) == 1
    again = cpu_spec(2)
    assert again.extra["probe"]["cached"] is True
    assert again.bandwidth == cpu_hw.bandwidth and again.peak_flops == cpu_hw.peak_flops
    # Price and power are the 2/64 share of the reference server CPU.
    assert again.price_usd == pytest.approx(7200 * 2 / 64) and again.tdp_w == pytest.approx(
        350 * 2 / 64
    )


def _record(**kw) -> dict:
    zero_terms = {f"flops_{t}": 0.0 for t in cap_metrics.DEFINITIONS["complete"]["flops"]} | {
        f"weight_bytes_{t}": 0.0 for t in cap_metrics.DEFINITIONS["complete"]["weights"]
    }
    base = {
        "mode": "decode", "n_tokens": 1, "seconds": 1.0, "kv_bytes_unique": 0.0,
        "kv_bytes_written": 0.0, "moe_layers": 0, "experts_active_sum": 0.0,
        "weight_bytes_dtype_q4_1": 1.0, "weight_bytes_dtype_f32": 0.0,
    }  # fmt: skip
    return zero_terms | base | kw


def test_smbu_smfu_formulas_and_both_aggregates():
    spec = HardwareSpec(
        "toy", "cpu", {"fp32": 100.0, "int8": 200.0}, bandwidth=1000.0, price_usd=1, tdp_w=1
    )
    recs = [
        # 300 B of attention + FFN weights, 100 B KV, 50 B LM head, 10 B embed in 1 s.
        _record(weight_bytes_attn=100.0, weight_bytes_dense_ffn=200.0, kv_bytes_unique=100.0,
                weight_bytes_lm_head=50.0, weight_bytes_embed=10.0, kv_bytes_written=4.0,
                flops_attn_proj=20.0, flops_dense_ffn=40.0, flops_attn_scores=10.0,
                flops_lm_head=30.0),
        # Same bytes in 3 s.
        _record(weight_bytes_attn=100.0, weight_bytes_dense_ffn=200.0, kv_bytes_unique=100.0,
                weight_bytes_lm_head=50.0, weight_bytes_embed=10.0, kv_bytes_written=4.0,
                flops_attn_proj=20.0, flops_dense_ffn=40.0, flops_attn_scores=10.0,
                flops_lm_head=30.0, seconds=3.0),
    ]  # fmt: skip
    df = cap_metrics.per_pass(recs, spec)
    assert (df["compute_dtype"] == "int8").all()  # the weights are quantized
    assert df["s_mbu_compat"].tolist() == pytest.approx([400 / 1000, 400 / 3 / 1000])
    assert df["s_mbu_complete"].tolist() == pytest.approx([464 / 1000, 464 / 3 / 1000])
    assert df["s_mfu_compat"].tolist() == pytest.approx([70 / 200, 70 / 3 / 200])
    assert df["s_mfu_complete"].tolist() == pytest.approx([100 / 200, 100 / 3 / 200])
    agg = cap_metrics.aggregate(df, spec).set_index("mode")
    assert agg.loc["all", "s_mbu_compat_mean"] == pytest.approx((0.4 + 0.4 / 3) / 2)
    assert agg.loc["all", "s_mbu_compat_total"] == pytest.approx(800 / 4 / 1000)
    assert agg.loc["decode", "passes"] == 2
    assert np.isnan(df["e_act"]).all()
    moe = cap_metrics.per_pass([_record(moe_layers=2, experts_active_sum=7.0)], spec)
    assert moe["e_act"].iloc[0] == 3.5


def test_smbu_smfu_in_unit_interval_on_real_runs(smollm2, cpu_hw):
    from lmengine import SamplingParams

    smollm2.reset_counters()
    prompts = [list(range(100, 140)), list(range(200, 233))]
    smollm2.generate_batch_ids(
        prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    )
    df = cap_metrics.per_pass(smollm2.counters(), cpu_hw)
    assert list(df["mode"]) == ["prefill"] + ["decode"] * 7
    assert (df["n_tokens"] == [73] + [2] * 7).all()
    agg = cap_metrics.aggregate(df, cpu_hw).set_index("mode")
    for d in cap_metrics.DEFINITIONS:
        for how in ("mean", "total"):
            assert 0 < agg.loc["decode", f"s_mbu_{d}_{how}"] <= 1, agg.T
            assert 0 < agg.loc["all", f"s_mfu_{d}_{how}"] <= 1, agg.T
    # Complete counts more than MoE-CAP's definition.
    assert (df["bytes_complete"] > df["bytes_compat"]).all()
    assert (df["flops_complete"] > df["flops_compat"]).all()


def test_questions_are_deterministic_and_exact():
    qs = acc.make_questions(40, seed=3)
    assert qs == acc.make_questions(40, seed=3) and qs != acc.make_questions(40, seed=4)
    units = {"centimeters": 100, "grams": 1000, "minutes": 60, "seconds": 60, "meters": 1000,
             "milliliters": 1000}  # fmt: skip
    for q in qs:
        m = re.match(r"What is (\d+) (\+|-|times) (\d+)\?", q.text)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert q.answer == {"+": a + b, "-": a - b, "times": a * b}[op]
        else:
            m = re.match(r"How many (\w+) are in (\d+) (\w+)\?", q.text)
            assert q.answer == units[m.group(1)] * int(m.group(2))
    assert acc.score_answer("3 + 4 = 7", 7)
    assert acc.score_answer("It is 1,000 grams.", 1000)
    assert not acc.score_answer("12 + 5 = 6", 17)
    assert not acc.score_answer("no number", 1)


def test_window_nll_matches_a_direct_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 11)).astype(np.float32)
    ids = [1, 4, 2, 10, 0]
    total, n = acc.window_nll(logits, ids)
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    assert n == 4 and total == pytest.approx(-sum(np.log(p[i, ids[i + 1]]) for i in range(4)))


def test_radar_axis_and_cost():
    assert normalise_axis([1, 2, 3], True).tolist() == [20, 60, 100]
    assert normalise_axis([1, 2, 3], False).tolist() == [100, 60, 20]
    assert normalise_axis([5, 5], True).tolist() == [100, 100]
    c = CostModel(price_usd=3 * 365.25 * 86400, tdp_w=100, lifetime_years=3, usd_per_kwh=0.36)
    # $1/s of hardware for 2 s plus 3.6 MJ = 1 kWh = $0.36, over 1e6 tokens.
    assert c.cost_per_mtok(2.0, 3.6e6, 1_000_000) == pytest.approx(2.36)


def test_energy_meter_without_sources_reports_unknown():
    devices = gpu_devices()  # [] without NVML or a GPU: skipped, never an error
    assert all(d["memory_total_bytes"] > 0 for d in devices)
    with EnergyMeter(use_gpu=False) as m:
        sum(range(1000))
    r = m.reading
    assert r.seconds > 0
    if r.cpu_energy_j is None:
        assert r.energy_j is None and any("RAPL" in n for n in r.notes)
    else:
        assert r.cpu_energy_j >= 0 and "rapl" in r.sources


def test_system_parsing_and_missing_peers(tmp_path):
    s = parse_system("lmengine:activation_bits=8,kv_dtype=f16")
    assert s.options == {"activation_bits": 8, "kv_dtype": "f16"}
    assert s.label == "lmengine:activation_bits=8,kv_dtype=f16"
    assert parse_system("llamacpp:model=other.gguf").options == {"model": "other.gguf"}
    with pytest.raises(InvalidRequestError, match="only a model= option"):
        parse_system("llamacpp:n_threads=2")
    with pytest.raises(InvalidRequestError, match="unknown system"):
        parse_system("vllm")
    with pytest.raises(InvalidRequestError, match="not key=value"):
        parse_system("lmengine:activation_bits")
    with pytest.raises(InvalidRequestError, match="peer 'llamacpp' is not installed"):
        peer_python("llamacpp", str(tmp_path / "no-python"))


def test_bench_cap_end_to_end(smollm2_gguf_path, probe_home, cpu_hw, tmp_path, capsys):
    from lmengine.cli import main

    out = tmp_path / "cap"
    rc = main(
        ["bench", "cap", "-m", str(smollm2_gguf_path), "-t", "2", "--systems", "lmengine",
         f"lmengine:activation_bits=8,model={smollm2_gguf_path}", "--batch-sizes", "1,2", "--prompt-tokens", "16",
         "--output-tokens", "4", "--questions", "4", "--ppl-window", "48", "-o", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    for name in ("cap_radar.png", "cap_radar.svg", "smbu_smfu_vs_batch.png", "smbu_smfu_vs_batch.svg",
                 "runs.csv", "passes.csv", "summary.md", "results.json"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    runs = pd.read_csv(out / "runs.csv")
    for col in ("system", "batch_size", "ttft_s", "tpot_s", "throughput_tok_s", "energy_j",
                "energy_source", "cost_usd_per_mtok", "accuracy", "perplexity",
                "decode_s_mbu_compat_mean", "decode_s_mbu_complete_total",
                "prefill_s_mfu_compat_mean", "prefill_s_mfu_complete_total"):  # fmt: skip
        assert col in runs.columns, col
    assert len(runs) == 4 and set(runs["batch_size"]) == {1, 2}
    assert (runs["throughput_tok_s"] > 0).all() and (runs["cost_usd_per_mtok"] > 0).all()
    assert runs["perplexity"].between(1, 1000).all()
    passes = pd.read_csv(out / "passes.csv")
    assert {"s_mbu_compat", "s_mfu_complete", "flops_attn_scores", "system"} <= set(passes.columns)
    summary = (out / "summary.md").read_text()
    assert "CAP radar" in summary and "perplexity = exp(mean NLL" in summary
    assert "arith-units accuracy" in capsys.readouterr().out
