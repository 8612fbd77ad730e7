"""``lmengine bench cap``: one workload on several systems; Cost, Accuracy, Performance per system.

A *system* is ``kind[:key=value,...]``: ``lmengine`` with any ``LLM(...)`` keyword
(``lmengine:activation_bits=8``, ``lmengine:kv_dtype=f16``; new engine options such as an
``attention=`` mode slot in unchanged) and ``model=`` for another quantization of the same model
(same tokenizer: the token ids are shared), or a peer (``model=`` only), ``llamacpp`` (llama-cpp-python, from the side
venv that bench/bench_decode.py builds) or ``hf`` (transformers, the GGUF dequantized to fp32).
Every system gets the same token ids: the question prompts (rendered with the model's chat
template), the perplexity windows and the workload prompts (windows of the license text at
distinct offsets, so no prefix cache can skip work).

Per system and batch size b: b requests of ``prompt_tokens`` prompt tokens each generate exactly
``output_tokens`` tokens greedily (EOS ignored), submitted together.
  TTFT = mean over requests of (first token chosen - request admitted)
  TPOT = mean over requests of (last token - first token) / (output_tokens - 1)
  throughput = b * output_tokens / wall time of the whole batch
lmengine serves the batch with batched steps; llama.cpp's Python binding runs one sequence per
context, so it serves the requests one after another (its TTFT then excludes queueing).
S-MBU / S-MFU come from the core's per-pass counters (lmengine only; peers expose none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmengine.bench import accuracy as acc
from lmengine.bench import cap_metrics
from lmengine.bench.hardware import GPU_SPECS, HardwareSpec, cpu_spec, gpu_spec_for_name
from lmengine.bench.telemetry import EnergyMeter, gpu_devices
from lmengine.errors import InvalidRequestError

__all__ = ["SystemConfig", "Workload", "CostModel", "parse_system", "run_cap", "PEER_KINDS"]

PEER_KINDS = ("llamacpp", "hf")
LLAMACPP_PYTHON = Path.home() / ".cache" / "lmengine" / "peers" / "llamacpp-venv" / "bin" / "python"
SECONDS_PER_YEAR = 365.25 * 86400


@dataclass
class SystemConfig:
    kind: str  # "lmengine" or a peer kind
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.options.items())


def _coerce(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def parse_system(text: str) -> SystemConfig:
    """``kind[:key=value,...]`` -> SystemConfig; values become int/float/bool where they parse."""
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in ("lmengine", *PEER_KINDS):
        raise InvalidRequestError(
            f"unknown system {kind!r} in {text!r}; choose lmengine[:key=value,...], llamacpp or hf"
        )
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InvalidRequestError(f"system option {item!r} in {text!r} is not key=value")
        options[key.strip()] = _coerce(value.strip())
    if kind != "lmengine" and set(options) - {"model"}:
        raise InvalidRequestError(f"peer {kind!r} takes only a model= option, got {options}")
    return SystemConfig(kind, options)


@dataclass
class Workload:
    batch_sizes: list[int]
    prompt_tokens: int = 64
    output_tokens: int = 32
    n_questions: int = 16
    question_max_tokens: int = 12
    ppl_window: int = 256
    ppl_windows: int = 1


@dataclass
class CostModel:
    """$ per million output tokens = (amortised hardware $/s x wall s + energy kWh x $/kWh) /
    output tokens x 1e6. Hardware is amortised over lifetime_years of continuous use."""

    price_usd: float
    tdp_w: float
    lifetime_years: float = 3.0
    usd_per_kwh: float = 0.15

    def cost_per_mtok(self, wall_s: float, energy_j: float, output_tokens: int) -> float:
        hw = self.price_usd / (self.lifetime_years * SECONDS_PER_YEAR) * wall_s
        energy = energy_j / 3.6e6 * self.usd_per_kwh
        return (hw + energy) / max(output_tokens, 1) * 1e6


@dataclass
class Inputs:
    """The token ids every system receives."""

    questions: list[acc.Question]
    question_ids: list[list[int]]
    ppl_windows: list[list[int]]
    prompts: list[list[int]]
    eos_ids: list[int]
    decode: Any  # ids -> text (the driver's tokenizer scores every system's replies)


def prepare_inputs(model_path: Path, workload: Workload) -> Inputs:
    from lmengine.models.loader import load_checkpoint
    from lmengine.tokenizer import Tokenizer

    ckpt = load_checkpoint(model_path)
    if ckpt.format == "gguf":
        tok = Tokenizer.from_gguf_metadata(ckpt.metadata)
    else:
        tok = Tokenizer.from_file(ckpt.tokenizer_dir)
    questions = acc.make_questions(workload.n_questions)
    q_ids = [tok.encode_chat([{"role": "user", "content": q.text}]) for q in questions]
    used = workload.ppl_window * workload.ppl_windows
    n_prompts = max(workload.batch_sizes)
    needed = used + n_prompts * workload.prompt_tokens
    # Tokenize only a prefix that surely holds the tokens needed (English text: < 8 chars per
    # token); the whole text when that is not enough.
    text = acc.license_text()
    stream = tok.encode(text[: needed * 8 + 4096], add_special_tokens=False)
    if len(stream) < needed:
        stream = tok.encode(text, add_special_tokens=False)
    ppl = acc.perplexity_windows(stream, workload.ppl_window, workload.ppl_windows)
    rest = stream[used:]
    # Consecutive windows: distinct token ids at every position, so no prefix is shared.
    prompts = [
        rest[i * workload.prompt_tokens : (i + 1) * workload.prompt_tokens]
        for i in range(n_prompts)
    ]
    if any(len(p) != workload.prompt_tokens for p in prompts):
        raise InvalidRequestError(
            f"the license text is too short for {n_prompts} prompts of {workload.prompt_tokens} tokens"
        )
    return Inputs(questions, q_ids, ppl, prompts, sorted(tok.eos_token_ids), tok.decode)


def select_hardware(
    name: str, threads: int, price: float | None, tdp: float | None, reprobe: bool = False
) -> HardwareSpec:
    """'auto' and 'cpu' give the probed CPU (the core computes on the CPU); a table name gives
    that GPU row, for when the work ran there."""
    if name in ("auto", "cpu"):
        return cpu_spec(threads, reprobe=reprobe, price_usd=price, tdp_w=tdp)
    if name not in GPU_SPECS:
        raise InvalidRequestError(
            f"unknown hardware {name!r}; choose cpu or one of {sorted(GPU_SPECS)}"
        )
    spec = GPU_SPECS[name]
    if price is not None or tdp is not None:
        spec = HardwareSpec(
            **{**spec.to_dict(), "price_usd": price or spec.price_usd, "tdp_w": tdp or spec.tdp_w}
        )
    return spec


def _score(inputs: Inputs, answers: list[list[int]]) -> tuple[float, list[dict]]:
    detail = []
    for q, ids in zip(inputs.questions, answers):
        reply = inputs.decode([t for t in ids if t not in inputs.eos_ids])
        detail.append(
            {
                "question": q.text,
                "answer": q.answer,
                "reply": reply,
                "correct": acc.score_answer(reply, q.answer),
            }
        )
    return float(np.mean([d["correct"] for d in detail])) if detail else float("nan"), detail


def _energy_for_cost(reading, wall_s: float, cost: CostModel) -> tuple[float, float | None, str]:
    """(joules used for cost, measured joules or None, source)."""
    if reading is not None and reading.energy_j is not None:
        return reading.energy_j, reading.energy_j, "+".join(reading.sources)
    return cost.tdp_w * wall_s, None, "tdp-estimate"


def _run_row(
    system: SystemConfig,
    b: int,
    workload: Workload,
    ttft,
    decode_s,
    wall_s,
    energy,
    cost: CostModel,
    hw: HardwareSpec,
) -> dict:
    n = workload.output_tokens
    joules, measured, source = energy
    return {
        "system": system.label,
        "kind": system.kind,
        "batch_size": b,
        "prompt_tokens": workload.prompt_tokens,
        "output_tokens": n,
        "ttft_s": float(np.mean(ttft)),
        "tpot_s": float(np.mean([d / max(n - 1, 1) for d in decode_s])),
        "throughput_tok_s": b * n / wall_s,
        "wall_s": wall_s,
        "energy_j": measured,
        "energy_j_for_cost": joules,
        "energy_source": source,
        "cost_usd_per_mtok": cost.cost_per_mtok(wall_s, joules, b * n),
        "hardware": hw.name,
    }


def _add_counter_metrics(row: dict, passes: pd.DataFrame, hw: HardwareSpec) -> None:
    agg = cap_metrics.aggregate(passes, hw, by="mode")
    for mode in ("decode", "prefill"):
        sel = agg[agg["mode"] == mode]
        for metric in ("s_mbu", "s_mfu"):
            for d in cap_metrics.DEFINITIONS:
                for how in ("mean", "total"):
                    col = f"{metric}_{d}_{how}"
                    row[f"{mode}_{col}"] = float(sel[col].iloc[0]) if len(sel) else float("nan")
    row["compute_dtype"] = passes["compute_dtype"].iloc[0] if len(passes) else None


def _system_model(options: dict, default: Path) -> Path:
    """A system's own checkpoint (``model=`` option: another quantization of the same model,
    sharing its tokenizer), else the run's model. Pops the option."""
    if "model" not in options:
        return default
    from lmengine.registry import resolve_model

    return resolve_model(str(options.pop("model")))


def run_lmengine(system, model_path, threads, workload, inputs, hw, cost, progress):
    from lmengine.llm import LLM
    from lmengine.sampling import SamplingParams

    longest_q = max(len(q) for q in inputs.question_ids) + workload.question_max_tokens
    need = max(
        len(inputs.question_ids) * longest_q,
        max(workload.batch_sizes) * (workload.prompt_tokens + workload.output_tokens),
        workload.ppl_window,
    )
    kv_tokens = int(need * 1.25) + 64
    options = dict(system.options)
    path = _system_model(options, model_path)
    t0 = time.perf_counter()
    llm = LLM(path, n_threads=threads, kv_cache_tokens=kv_tokens, **options)
    info = {"load_s": time.perf_counter() - t0, "version": "lmengine", "threads": llm.n_threads}
    progress.set_postfix_str(f"{system.label}: accuracy")
    outs = llm.generate_batch_ids(
        inputs.question_ids, SamplingParams(max_tokens=workload.question_max_tokens, temperature=0)
    )
    info["accuracy"], info["answers"] = _score(inputs, [o.token_ids for o in outs])
    progress.update(1)
    progress.set_postfix_str(f"{system.label}: perplexity")
    nll = [acc.window_nll(llm.logits(w), w) for w in inputs.ppl_windows]
    info["perplexity"] = float(np.exp(sum(s for s, _ in nll) / sum(c for _, c in nll)))
    progress.update(1)
    params = SamplingParams(max_tokens=workload.output_tokens, temperature=0, ignore_eos=True)
    llm.generate_batch_ids(
        inputs.prompts[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    )
    rows, pass_frames = [], []
    for b in workload.batch_sizes:
        progress.set_postfix_str(f"{system.label}: batch {b}")
        llm.reset_counters()
        with EnergyMeter() as meter:
            t = time.perf_counter()
            outs = llm.generate_batch_ids(inputs.prompts[:b], params)
            wall = time.perf_counter() - t
        ttft = [o.metrics["ttft_s"] for o in outs]
        decode = [o.metrics["total_s"] - o.metrics["ttft_s"] for o in outs]
        passes = cap_metrics.per_pass(llm.counters(), hw)
        passes.insert(0, "system", system.label)
        passes.insert(1, "batch_size", b)
        row = _run_row(
            system,
            b,
            workload,
            ttft,
            decode,
            wall,
            _energy_for_cost(meter.reading, wall, cost),
            cost,
            hw,
        )
        _add_counter_metrics(row, passes, hw)
        rows.append(row)
        pass_frames.append(passes)
        progress.update(1)
    return rows, pass_frames, info


def peer_python(kind: str, llamacpp_python: str | None) -> str:
    """The interpreter that runs a peer, or a clear error when the peer is not installed."""
    if kind == "llamacpp":
        python = Path(llamacpp_python) if llamacpp_python else LLAMACPP_PYTHON
        ok = (
            python.exists()
            and subprocess.run(
                [str(python), "-c", "import llama_cpp"], capture_output=True
            ).returncode
            == 0
        )
        if not ok:
            raise InvalidRequestError(
                f"peer 'llamacpp' is not installed: llama_cpp does not import under {python}. "
                "Build it with `python bench/bench_decode.py --systems llamacpp` (creates the side "
                "venv ~/.cache/lmengine/peers/llamacpp-venv) or pass --llamacpp-python"
            )
        return str(python)
    probe = subprocess.run(
        [sys.executable, "-c", "import transformers, torch"], capture_output=True
    )
    if probe.returncode != 0:
        raise InvalidRequestError(
            "peer 'hf' is not installed: transformers and torch do not import under "
            f"{sys.executable} (pip install 'lmengine[test]')"
        )
    return sys.executable


def peer_available(kind: str, llamacpp_python: str | None = None) -> bool:
    try:
        peer_python(kind, llamacpp_python)
        return True
    except InvalidRequestError:
        return False


def run_peer(system, model_path, threads, workload, inputs, hw, cost, progress, python, out_dir):
    model_path = _system_model(dict(system.options), model_path)
    if Path(model_path).suffix != ".gguf":
        raise InvalidRequestError(f"peer {system.kind} needs a .gguf model, got {model_path}")
    here = Path(__file__).resolve().parent
    n_ctx = (
        max(
            max(len(q) for q in inputs.question_ids) + workload.question_max_tokens,
            workload.prompt_tokens + workload.output_tokens,
            workload.ppl_window,
        )
        + 16
    )
    cfg = {
        "system": system.kind,
        "model": str(model_path),
        "threads": threads,
        "n_ctx": n_ctx,
        "eos_ids": inputs.eos_ids,
        "questions": inputs.question_ids,
        "question_max_tokens": workload.question_max_tokens,
        "ppl_windows": inputs.ppl_windows,
        "batch_sizes": workload.batch_sizes,
        "prompts": inputs.prompts,
        "output_tokens": workload.output_tokens,
        "telemetry_path": str(here / "telemetry.py"),
    }
    cfg_path = out_dir / f".peer_{system.kind}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["TQDM_DISABLE"] = "1"
    progress.set_postfix_str(f"{system.label}: running in its own process")
    try:
        proc = subprocess.run(
            [python, str(here / "cap_peer_worker.py"), str(cfg_path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=3600,
        )
    finally:
        cfg_path.unlink(missing_ok=True)
    result = next(
        (
            json.loads(line.split(" ", 1)[1])
            for line in proc.stdout.splitlines()
            if line.startswith("CAP_RESULT ")
        ),
        None,
    )
    if result is None or "error" in result:
        why = result["error"] if result else f"worker exited with status {proc.returncode}"
        raise RuntimeError(f"peer {system.kind} failed: {why}")
    info = {"load_s": result["load_s"], "version": result["version"], "threads": threads}
    info["accuracy"], info["answers"] = _score(inputs, result["answers"])
    info["perplexity"] = float(np.exp(result["ppl_nll"] / result["ppl_count"]))
    progress.update(2)
    rows = []
    for r in result["runs"]:
        reading = None
        if r["energy_j"] is not None:
            reading = type("R", (), {"energy_j": r["energy_j"], "sources": r["energy_sources"]})
        row = _run_row(
            system,
            r["batch_size"],
            workload,
            r["ttft_s"],
            r["decode_s"],
            r["wall_s"],
            _energy_for_cost(reading, r["wall_s"], cost),
            cost,
            hw,
        )
        rows.append(row)
        progress.update(1)
    return rows, [], info


def run_cap(
    systems: list[SystemConfig],
    model_path: Path,
    workload: Workload,
    out_dir: Path,
    *,
    threads: int,
    hardware: str = "auto",
    reprobe: bool = False,
    price_usd: float | None = None,
    tdp_w: float | None = None,
    lifetime_years: float = 3.0,
    usd_per_kwh: float = 0.15,
    llamacpp_python: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Runs every system and writes the report into out_dir; returns the results."""
    from tqdm import tqdm

    from lmengine.bench.cap_report import write_report

    pythons = {
        s.kind: peer_python(s.kind, llamacpp_python) for s in systems if s.kind in PEER_KINDS
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = select_hardware(hardware, threads, price_usd, tdp_w, reprobe)
    cost = CostModel(hw.price_usd, hw.tdp_w, lifetime_years, usd_per_kwh)
    inputs = prepare_inputs(model_path, workload)
    gpus = []
    for g in gpu_devices():
        row = gpu_spec_for_name(g["name"])
        gpus.append({k: v for k, v in g.items() if k != "handle"} | {"spec": row and row.name})
    rows, passes, infos = [], [], {}
    total = len(systems) * (2 + len(workload.batch_sizes))
    with tqdm(
        total=total, desc="bench cap", unit="step", disable=not show_progress, file=sys.stderr
    ) as progress:
        for system in systems:
            if system.kind == "lmengine":
                r, p, info = run_lmengine(
                    system, model_path, threads, workload, inputs, hw, cost, progress
                )
            else:
                r, p, info = run_peer(
                    system,
                    model_path,
                    threads,
                    workload,
                    inputs,
                    hw,
                    cost,
                    progress,
                    pythons[system.kind],
                    out_dir,
                )
            for row in r:
                row.update(
                    accuracy=info["accuracy"], perplexity=info["perplexity"], load_s=info["load_s"]
                )
            rows += r
            passes += p
            infos[system.label] = info
    results = {
        "runs": pd.DataFrame(rows),
        "passes": pd.concat(passes, ignore_index=True) if passes else pd.DataFrame(),
        "systems": infos,
        "hardware": hw,
        "gpus": gpus,
        "cost": cost,
        "workload": workload,
        "model": str(model_path),
        "threads": threads,
    }
    results["files"] = write_report(results, out_dir)
    return results
