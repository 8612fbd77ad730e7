"""``lmengine serve``: the OpenAI-compatible server from the command line."""

from __future__ import annotations

import argparse
import sys


def add_serve_parser(sub) -> None:
    from lmengine.cli import _add_model_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", default=None, help="the model's id in the API (default: -m)"
    )
    p.add_argument("--max-step-tokens", type=int, default=512, help="token budget of one step")
    p.add_argument(
        "--step-time-target",
        type=float,
        default=None,
        help="seconds: steps with decodes take prompt tokens only while their predicted time "
        "stays under this (bounds time per output token; default: no bound)",
    )
    p.add_argument("--max-running", type=int, default=256, help="sequences in one step, at most")
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices) a request may ask")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from lmengine.cli import _load
    from lmengine.serving.async_engine import AsyncEngine
    from lmengine.serving.server import serve

    llm = _load(args)
    engine = AsyncEngine(
        llm,
        max_step_tokens=args.max_step_tokens,
        max_running=args.max_running,
        step_time_target=args.step_time_target,
    )
    name = args.served_model_name or args.model
    print(
        f"[lmengine] serving {name!r} on http://{args.host}:{args.port}/v1 "
        f"(context {llm.max_context}, KV pool {engine.stats().total_pages * engine.stats().page_size} "
        f"positions)",
        file=sys.stderr,
        flush=True,
    )
    serve(
        engine,
        name,
        args.host,
        args.port,
        max_n=args.max_n,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0
