"""The ``lmengine`` command: pull, list, generate, chat, bench, profile, serve."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmengine.errors import LMEngineError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", default="smollm2-135m", help="registry name, .gguf file or HF directory"
    )
    p.add_argument(
        "-t", "--threads", type=int, default=None, help="CPU threads (default: all available)"
    )
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size in positions")
    p.add_argument("--kv-dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--max-context", type=int, default=None)
    _add_attention_args(p)


def _add_attention_args(p: argparse.ArgumentParser) -> None:
    """--attention and the ReSAConfig fields (see lmengine.resa)."""
    from lmengine.resa import ATTENTION_MODES, ReSAConfig

    d = ReSAConfig()
    g = p.add_argument_group("decode attention (ReSA block-sparse decoding)")
    g.add_argument("--attention", default="dense", choices=ATTENTION_MODES)
    g.add_argument("--resa-block-size", type=int, default=d.block_size, help="= KV page size")
    g.add_argument("--resa-keep", type=float, default=d.keep, help="kept fraction of blocks")
    g.add_argument("--resa-n-min", type=int, default=d.n_min, help="fewest kept blocks")
    g.add_argument("--resa-n-local", type=int, default=d.n_local, help="last blocks always kept")
    g.add_argument("--resa-n-sink", type=int, default=d.n_sink, help="first blocks always kept")
    g.add_argument(
        "--resa-rectify-every",
        type=int,
        default=d.rectify_every,
        help="f: tokens per rectification",
    )


def _attention_kwargs(args: argparse.Namespace) -> dict:
    """LLM keyword arguments for the --attention / --resa-* flags."""
    from lmengine.resa import ReSAConfig

    return {
        "attention": args.attention,
        "resa": ReSAConfig(
            block_size=args.resa_block_size,
            keep=args.resa_keep,
            n_min=args.resa_n_min,
            n_local=args.resa_n_local,
            n_sink=args.resa_n_sink,
            rectify_every=args.resa_rectify_every,
        ),
    }


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args: argparse.Namespace):
    from lmengine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def _load(args: argparse.Namespace):
    from lmengine.llm import LLM
    from lmengine.registry import REGISTRY, model_home

    if args.model in REGISTRY and not (model_home() / "models" / args.model).exists():
        from lmengine.registry import pull

        pull(args.model)
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        n_threads=args.threads,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_dtype=args.kv_dtype,
        max_context=args.max_context,
        **_attention_kwargs(args),
    )
    print(
        f"[lmengine] loaded {args.model} in {time.perf_counter() - t0:.2f} s "
        f"({llm.n_threads} threads)",
        file=sys.stderr,
    )
    return llm


def cmd_pull(args: argparse.Namespace) -> int:
    from lmengine.registry import pull

    path = pull(args.name, progress=True, force=args.force)
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from lmengine.registry import list_models

    for m in list_models():
        mark = "pulled" if m["pulled"] else "-"
        print(f"{m['name']:<16} {mark:<7} {m['description']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _sampling(args)
    prompts = args.prompt or [sys.stdin.read()]
    if args.no_stream or len(prompts) > 1:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        for o in outs:
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt": o.prompt,
                            "text": o.text,
                            "token_ids": o.token_ids,
                            "finish_reason": o.finish_reason,
                        }
                    )
                )
            else:
                print(o.prompt + o.text)
        n = sum(len(o.token_ids) for o in outs)
        print(f"[lmengine] {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    sys.stdout.write(prompts[0])
    n = 0
    for piece in llm.stream(prompts[0], params):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[lmengine] {dt:.2f} s", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _sampling(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("[lmengine] chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        out = llm.chat(messages, params)
        print(out.text.strip())
        messages.append({"role": "assistant", "content": out.text})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a registry model into the cache")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="list registry models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("generate", help="generate a completion")
    _add_model_args(p)
    _add_sampling_args(p, 64)
    p.add_argument("prompt", nargs="*", help="prompt(s); read from stdin if none")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat using the model's template")
    _add_model_args(p)
    _add_sampling_args(p, 256)
    p.add_argument("--system", default=None)
    p.set_defaults(func=cmd_chat)

    from lmengine.bench_cli import add_bench_parser

    add_bench_parser(sub)

    from lmengine.profile_cli import add_profile_parser

    add_profile_parser(sub)

    from lmengine.serving.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LMEngineError as e:
        print(f"lmengine: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
