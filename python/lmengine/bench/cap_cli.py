"""``lmengine bench cap``: Cost / Accuracy / Performance of lmengine configurations and peers on
one workload, with S-MBU / S-MFU from the core's counters. See lmengine.bench.cap_run."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

QUICK = {
    "batch_sizes": "1,4",
    "prompt_tokens": 64,
    "output_tokens": 16,
    "questions": 16,
    "ppl_window": 256,
    "ppl_windows": 1,
}
FULL = {
    "batch_sizes": "1,2,4,8,16",
    "prompt_tokens": 128,
    "output_tokens": 64,
    "questions": 48,
    "ppl_window": 512,
    "ppl_windows": 4,
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sorted(set(values))


def run_cap_command(args: argparse.Namespace) -> int:
    from lmengine.bench.cap_run import Workload, parse_system, peer_available, run_cap
    from lmengine.registry import REGISTRY, model_home, pull, resolve_model

    preset = QUICK if args.quick else FULL
    pick = lambda name: preset[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    workload = Workload(
        batch_sizes=_int_list(str(pick("batch_sizes"))),
        prompt_tokens=int(pick("prompt_tokens")),
        output_tokens=int(pick("output_tokens")),
        n_questions=int(pick("questions")),
        ppl_window=int(pick("ppl_window")),
        ppl_windows=int(pick("ppl_windows")),
    )
    if args.model in REGISTRY and not (model_home() / "models" / args.model).exists():
        pull(args.model)
    model_path = resolve_model(args.model)
    if args.systems:
        systems = [parse_system(s) for s in args.systems]
    else:
        systems = [parse_system("lmengine"), parse_system("lmengine:activation_bits=8")]
        if peer_available("llamacpp", args.llamacpp_python) and str(model_path).endswith(".gguf"):
            systems.append(parse_system("llamacpp"))
        else:
            print("[lmengine] llama.cpp peer not installed: skipped (see --help)", file=sys.stderr)
    threads = args.threads or max(1, len(os.sched_getaffinity(0)))
    out_dir = Path(args.output or f"bench/results/cap-{time.strftime('%Y%m%d-%H%M%S')}")
    print(
        f"[lmengine] bench cap: {[s.label for s in systems]} on {model_path.name}, {threads} threads",
        file=sys.stderr,
    )
    results = run_cap(
        systems,
        model_path,
        workload,
        out_dir,
        threads=threads,
        hardware=args.hardware,
        reprobe=args.reprobe,
        price_usd=args.hardware_price,
        tdp_w=args.hardware_watts,
        lifetime_years=args.lifetime_years,
        usd_per_kwh=args.usd_per_kwh,
        llamacpp_python=args.llamacpp_python,
        show_progress=not args.no_progress,
    )
    print(Path(results["files"]["summary_md"]).read_text())
    print(
        f"[lmengine] wrote {out_dir}/ (runs.csv, passes.csv, summary.md, cap_radar.png/.svg, "
        "smbu_smfu_vs_batch.png/.svg, results.json)",
        file=sys.stderr,
    )
    return 0


def add_cap_parser(sub) -> None:
    p = sub.add_parser(
        "cap",
        help="Cost/Accuracy/Performance report with S-MBU/S-MFU and CAP radar diagrams",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="systems: lmengine[:key=value,...] (any LLM keyword, e.g. activation_bits=8, "
        "kv_dtype=f16; model=PATH for another quantization of the same model), llamacpp (llama-cpp-python in ~/.cache/lmengine/peers/llamacpp-venv, "
        "built by bench/bench_decode.py), hf (transformers). Default: lmengine, "
        "lmengine:activation_bits=8 and llamacpp when installed.",
    )
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--systems", nargs="+", default=None, metavar="SYSTEM")
    p.add_argument(
        "--quick", action="store_true", help="small preset (~1-2 min on the default model)"
    )
    p.add_argument("--batch-sizes", dest="batch_sizes", default=None, help="e.g. 1,2,4,8")
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=None)
    p.add_argument("--output-tokens", dest="output_tokens", type=int, default=None)
    p.add_argument("--questions", type=int, default=None, help="arithmetic/unit questions")
    p.add_argument("--ppl-window", dest="ppl_window", type=int, default=None)
    p.add_argument("--ppl-windows", dest="ppl_windows", type=int, default=None)
    p.add_argument(
        "-o", "--output", default=None, help="output folder (default bench/results/cap-<time>)"
    )
    p.add_argument(
        "--hardware", default="auto", help="auto/cpu (probed) or a spec table name, e.g. H100-SXM"
    )
    p.add_argument(
        "--reprobe", action="store_true", help="measure the CPU peaks again (cached otherwise)"
    )
    p.add_argument(
        "--hardware-price", type=float, default=None, help="USD (default: spec table / CPU share)"
    )
    p.add_argument("--hardware-watts", type=float, default=None, help="W for the energy estimate")
    p.add_argument("--lifetime-years", type=float, default=3.0, help="hardware amortisation period")
    p.add_argument("--usd-per-kwh", type=float, default=0.15)
    p.add_argument(
        "--llamacpp-python", default=None, help="python with llama_cpp (default: side venv)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cap_command)
