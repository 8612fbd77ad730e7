"""``lmengine profile`` end to end on a short context: breakdown, JSON summary, Chrome trace."""

from __future__ import annotations

import json

import pytest

from lmengine import cli
from lmengine.profile_cli import GROUPS, op_group, supported_attention_modes


def run(args) -> int:
    return cli.main(["profile", *map(str, args)])


@pytest.mark.parametrize("fill", ["prefill", "import"])
def test_profile_writes_summary_and_trace(smollm2_gguf_path, tmp_path, capsys, fill):
    steps, batch = 3, 2
    rc = run(
        [
            "-m",
            smollm2_gguf_path,
            "-t",
            2,
            "--context",
            40,
            "--steps",
            steps,
            "--batch",
            batch,
            "--fill",
            fill,
            "--out",
            tmp_path,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    for g in GROUPS:
        assert g in printed
    summary = json.loads((tmp_path / "profile_summary.json").read_text())
    assert summary["steps"] == steps and summary["batch"] == batch and summary["fill"] == fill
    assert summary["rectification_steps"] == 0
    assert set(summary["group_s_per_step"]) == set(GROUPS)
    ops = summary["op_s_per_step"]
    assert {"attention", "matmul_ffn", "lm_head"} <= set(ops)
    assert summary["group_s_per_step"]["dense attention"] == pytest.approx(ops["attention"])
    # Groups partition the ops, and the ops cover most of the step's wall time.
    assert sum(summary["group_s_per_step"].values()) == pytest.approx(sum(ops.values()))
    assert 0.3 * summary["step_s_mean"] < sum(ops.values()) <= 1.05 * summary["step_s_mean"]
    # Dense KV bytes: both sequences at the middle context, K+V, every layer, f16.
    per_tok = 2 * 30 * 3 * 64 * 2
    assert summary["kv_bytes_dense_per_step"] == batch * (40 + 2 + steps // 2) * per_tok

    trace = json.loads((tmp_path / "profile_trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    step_events = [e for e in events if e["cat"] == "step"]
    op_events = [e for e in events if e["cat"] != "step"]
    assert len(step_events) == steps
    assert len(op_events) == steps * len(ops)
    for e in events:
        assert e["dur"] >= 0 and e["ts"] >= 0 and {"name", "pid", "tid"} <= set(e)
    # Op events of a step lie within it, in order.
    for i, st in enumerate(step_events):
        mine = [e for e in op_events if e["args"]["step"] == i]
        assert mine[0]["ts"] == pytest.approx(st["ts"])
        assert all(a["ts"] + a["dur"] == pytest.approx(b["ts"]) for a, b in zip(mine, mine[1:]))


def test_unsupported_attention_mode_is_refused(smollm2_gguf_path, tmp_path, capsys):
    if "no-such-mode" in supported_attention_modes():
        pytest.skip("mode exists")
    rc = run(
        [
            "-m",
            smollm2_gguf_path,
            "--context",
            20,
            "--steps",
            1,
            "--attention",
            "no-such-mode",
            "--out",
            tmp_path,
        ]
    )
    assert rc == 2
    assert "no-such-mode" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_before_the_run(smollm2_gguf_path, tmp_path, capsys):
    taken = tmp_path / "summary.json"
    taken.write_text("keep me")
    rc = run(["-m", smollm2_gguf_path, "--context", 20, "--steps", 1, "--out", taken])
    assert rc == 2
    err = capsys.readouterr().err
    assert "InvalidRequestError" in err and "--out" in err
    assert taken.read_text() == "keep me"


def test_op_groups():
    assert op_group("attention") == "dense attention"
    assert op_group("matmul_ffn") == op_group("activation") == "MLP"
    assert op_group("lm_head") == op_group("matmul_attn") == op_group("embed") == "other"
    assert op_group("sparse_attention") == "sparse attention"
    assert op_group("attention_sparse") == "sparse attention"
    assert op_group("block_selection") == op_group("kv_summaries") == "selection"
    assert op_group("rectification") == "rectification"
