"""MoE layer forward: lmengine's expert dispatch vs HF transformers' MoE block and a torch loop.

Question: how long does one MoE FFN layer (router, top-k, experts, weighted sum) take at 1, 8, 64
and 512 tokens, against
  * HF transformers' own sparse MoE block (OlmoeSparseMoeBlock / MixtralSparseMoeBlock) holding the
    same weights, in fp32 and bf16, each experts implementation that runs on this CPU ("eager" is
    the per-expert loop with index_add; "grouped_mm" where torch supports it; "batched_mm" is left
    out: it gathers a weight copy per (token, slot), GBs at 512 tokens),
  * a plain per-expert loop in torch (route, gather each expert's rows, two matmuls, index_add),
all with torch threads = engine threads (2 by default), and how close the engine gets to the memory
bandwidth: activated-expert bytes (distinct experts hit x 3 matrices x their bytes, plus the
router) / time against a numpy copy (2 x bytes / best time of a 512 MiB copy).

Shapes: "olmoe" = OLMoE-1B-7B's layer (64 experts, top-8, d 2048, ff 1024, no renormalisation);
"mixtral" = Mixtral-8x7B's routing (8 experts, top-2, renormalised) at d 2048, ff 3584 (half its
width, a quarter of its FFN, to fit in RAM next to the other helpers' jobs).

lmengine runs the weights as F32 and BF16 (like-for-like with torch fp32 / bf16) and as Q8_0 and
Q4_0 (quantized, compared with the faster of torch's fp32/bf16). Every engine variant is first
validated against HF fp32 at 8 tokens (printed max error x output range). Times are the best of
a few calls after one warm-up (best-of because the machine is shared). Consecutive calls take
different token batches (--batches of them, cycled; every system sees the same sequence), so they
route to different experts and read them from DRAM as decode steps do: one batch repeated would
find part of the last call's experts still in the 32 MiB L3 (that gave >100% of the copy
bandwidth in earlier tables). Activated bytes use the mean distinct experts over the batches.

    python bench/bench_moe.py [--shapes olmoe,mixtral] [--tokens 1,8,64,512] [--threads 2]
                              [--batches 8] [--out bench_results/moe]
Writes <out>/moe.csv and <out>/moe.json.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
from pathlib import Path

import numpy as np

from lmengine.bench_cli import best_seconds, measure_copy_bandwidth

SHAPES = {
    "olmoe": dict(E=64, k=8, d=2048, ff=1024, norm=False),
    "mixtral": dict(E=8, k=2, d=2048, ff=3584, norm=True),
}
BYTES_PER_WEIGHT = {"F32": 4.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}
GGML = {"F32": 0, "BF16": 30, "Q8_0": 8, "Q4_0": 2}


def cycling(fn, batches: list):
    """A no-argument callable: each call runs fn on the next batch, in a cycle."""
    it = itertools.cycle(batches)
    return lambda: fn(next(it))


def reps_for(T: int) -> int:
    return 2 if T >= 512 else 3 if T >= 64 else 10


def hf_block(shape: dict, router, gate_up, down, dtype, impl: str | None):
    import torch
    from transformers import MixtralConfig, OlmoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    kw = dict(
        hidden_size=shape["d"],
        intermediate_size=shape["ff"],
        num_experts_per_tok=shape["k"],
        experts_implementation=impl,
    )
    if shape["E"] == 8:
        block = MixtralSparseMoeBlock(MixtralConfig(num_local_experts=8, **kw))
    else:
        block = OlmoeSparseMoeBlock(OlmoeConfig(num_experts=shape["E"], norm_topk_prob=False, **kw))
    with torch.no_grad():
        block.gate.weight = torch.nn.Parameter(router.to(dtype), requires_grad=False)
        block.experts.gate_up_proj = torch.nn.Parameter(gate_up.to(dtype), requires_grad=False)
        block.experts.down_proj = torch.nn.Parameter(down.to(dtype), requires_grad=False)
    return block.eval()


def torch_loop(x, router, gate_up, down, k: int, norm: bool):
    """The per-expert loop: route, gather each expert's rows, two products, weighted index_add."""
    import torch

    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, idx = torch.topk(probs, k, dim=-1)
    if norm:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    ff = down.shape[2]
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        h = x[tok] @ gate_up[e].T
        y = (torch.nn.functional.silu(h[:, :ff]) * h[:, ff:]) @ down[e].T
        out.index_add_(0, tok, y * weights[tok, slot, None].to(x.dtype))
    return out


def engine_weights(kind: str, gate_up32, down32, gate_up_bf16, down_bf16, ff: int):
    """Per-expert (ggml_type, array, rows, cols) views for lmengine (no copy for F32/BF16)."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as G

    E, _, d = gate_up32.shape
    if kind == "F32":
        gu, dn = gate_up32.view(np.uint8), down32.view(np.uint8)
    elif kind == "BF16":
        gu = gate_up_bf16.view(np.uint8)
        dn = down_bf16.view(np.uint8)
    else:
        gt = G.Q8_0 if kind == "Q8_0" else G.Q4_0
        gu = quants.quantize(gate_up32, gt)
        dn = quants.quantize(down32, gt)
    t = GGML[kind]
    gate = [(t, gu[e, :ff].reshape(-1), ff, d) for e in range(E)]
    up = [(t, gu[e, ff:].reshape(-1), ff, d) for e in range(E)]
    down = [(t, dn[e].reshape(-1), d, ff) for e in range(E)]
    return gate, up, down


def run_shape(
    name: str, shape: dict, tokens: list[int], threads: int, bandwidth: float, n_batches: int
) -> list[dict]:
    import torch

    from lmengine import _core

    E, k, d, ff = shape["E"], shape["k"], shape["d"], shape["ff"]
    rng = np.random.default_rng(0)
    print(f"\n== {name}: {E} experts, top-{k}, d {d}, ff {ff}; building weights", flush=True)
    router = (rng.standard_normal((E, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    gate_up = rng.standard_normal((E, 2 * ff, d), dtype=np.float32)
    gate_up *= np.float32(1 / np.sqrt(d))
    down = rng.standard_normal((E, d, ff), dtype=np.float32)
    down *= np.float32(1 / np.sqrt(ff))
    x_all = rng.standard_normal((max(tokens) * n_batches, d), dtype=np.float32)

    t_router, t_gu, t_down = (torch.from_numpy(a) for a in (router, gate_up, down))
    gu_bf16 = t_gu.to(torch.bfloat16)
    down_bf16 = t_down.to(torch.bfloat16)
    router_w = (0, router.view(np.uint8).reshape(-1), E, d)

    hf = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for impl in ("eager", "grouped_mm"):
            block = hf_block(
                shape, t_router, t_gu, t_down, dtype, None if impl == "eager" else impl
            )
            try:
                with torch.no_grad():
                    block(torch.from_numpy(x_all[None, :8]).to(dtype))
            except Exception as e:  # an implementation this torch build lacks on CPU
                print(f"   HF {impl} {dtype_name}: skipped ({type(e).__name__}: {str(e)[:80]})")
                continue
            hf[(dtype_name, impl)] = block
    loops = {
        "fp32": (t_router, t_gu, t_down),
        "bf16": (t_router.to(torch.bfloat16), gu_bf16, down_bf16),
    }
    engines = {}
    for kind in ("F32", "BF16", "Q8_0", "Q4_0"):
        gu16 = gu_bf16.view(torch.int16).numpy()
        dn16 = down_bf16.view(torch.int16).numpy()
        gate, up, dn = engine_weights(kind, gate_up, down, gu16, dn16, ff)
        # The engine's defaults: wide activations, and fp32 activations for a sequence's chunk
        # of >= 8 tokens (each tokens count here is one sequence's chunk).
        engines[kind] = _core.kernels.MoELayer(
            router_w,
            gate,
            up,
            dn,
            k,
            norm_topk_prob=shape["norm"],
            n_threads=threads,
            fp32_prompt_min_tokens=8,
        )

    # Validate at 8 tokens against HF fp32 (eager) before timing anything.
    x8 = x_all[:8]
    with torch.no_grad():
        ref = hf[("fp32", "eager")](torch.from_numpy(x8)[None])[0].numpy()
        loop_out = torch_loop(torch.from_numpy(x8), *loops["fp32"], k, shape["norm"]).numpy()
    scale = float(ref.max() - ref.min())
    print(
        f"   check vs HF fp32 @8 tokens (max |err| / range, weight rounding included): torch loop "
        f"{np.abs(loop_out - ref).max() / scale:.1e}",
        end="",
    )
    for kind, layer in engines.items():
        out, _ = layer.forward(x8)
        print(f", {kind} {np.abs(out - ref).max() / scale:.1e}", end="")
    print(flush=True)

    rows = []
    for T in tokens:
        xs = [np.ascontiguousarray(x_all[i * T : (i + 1) * T]) for i in range(n_batches)]
        reps = reps_for(T)
        times = {}
        with torch.no_grad():
            xt = {
                "fp32": [torch.from_numpy(x) for x in xs],
                "bf16": [torch.from_numpy(x).to(torch.bfloat16) for x in xs],
            }
            for (dtype_name, impl), block in hf.items():
                xin = [x[None] for x in xt[dtype_name]]
                times[f"hf_{impl}_{dtype_name}"] = best_seconds(cycling(block, xin), reps)
            for dtype_name, weights in loops.items():
                fn = lambda v, w=weights: torch_loop(v, *w, k, shape["norm"])  # noqa: E731
                times[f"torch_loop_{dtype_name}"] = best_seconds(cycling(fn, xt[dtype_name]), reps)
        for kind, layer in engines.items():
            times[f"lmengine_{kind}"] = best_seconds(cycling(layer.forward, xs), reps)
        # Routing does not depend on the experts' format: one engine's counts serve all.
        layer = engines["Q4_0"]
        distinct = float(np.mean([(layer.forward(x)[1] > 0).sum() for x in xs]))
        hf_fp32 = min(
            v for key, v in times.items() if key.startswith("hf_") and key.endswith("fp32")
        )
        hf_bf16 = min(
            (v for key, v in times.items() if key.startswith("hf_") and key.endswith("bf16")),
            default=float("inf"),
        )
        hf_best = min(hf_fp32, hf_bf16)
        for key, t in times.items():
            row = dict(shape=name, tokens=T, impl=key, ms=1e3 * t, distinct_experts=distinct)
            if key.startswith("lmengine_"):
                kind = key.split("_", 1)[1]
                peer = {"F32": hf_fp32, "BF16": hf_bf16}.get(kind, hf_best)
                row["speedup_vs_hf"] = peer / t
                nbytes = distinct * 3 * d * ff * BYTES_PER_WEIGHT[kind] + E * d * 4
                row["activated_GBps"] = nbytes / t / 1e9
                row["pct_bandwidth"] = 100 * nbytes / t / bandwidth
            rows.append(row)
        print(f"-- {name} T={T}: {distinct:.1f}/{E} experts hit (mean over batches)", flush=True)
        for row in rows:
            if row["tokens"] != T:
                continue
            extra = ""
            if "speedup_vs_hf" in row:
                extra = (
                    f"  x{row['speedup_vs_hf']:.2f} vs HF   {row['activated_GBps']:.1f} GB/s "
                    f"({row['pct_bandwidth']:.0f}% of copy bw)"
                )
            print(f"   {row['impl']:<24} {row['ms']:10.2f} ms{extra}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="olmoe,mixtral")
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--batches", type=int, default=8, help="distinct token batches cycled (1: one, repeated)"
    )
    ap.add_argument("--out", default="bench_results/moe")
    args = ap.parse_args()
    if args.batches < 1:
        ap.error("--batches must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    from lmengine import _core

    tokens = [int(t) for t in args.tokens.split(",")]
    bandwidth = measure_copy_bandwidth(512 << 20) * 1e9
    print(
        f"machine: {platform.processor() or platform.machine()}, simd {_core.simd()}, "
        f"{args.threads} threads; numpy copy bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"(2 x 512 MiB / best of 5); torch {torch.__version__}"
    )
    rows = []
    for name in args.shapes.split(","):
        rows += run_shape(name, SHAPES[name], tokens, args.threads, bandwidth, args.batches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = [
        "shape",
        "tokens",
        "impl",
        "ms",
        "distinct_experts",
        "speedup_vs_hf",
        "activated_GBps",
        "pct_bandwidth",
    ]
    with open(out / "moe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    meta = dict(
        threads=args.threads,
        batches=args.batches,
        copy_bandwidth_GBps=bandwidth / 1e9,
        shapes=SHAPES,
        simd=_core.simd(),
        torch=torch.__version__,
    )
    (out / "moe.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nwrote {out / 'moe.csv'} and {out / 'moe.json'}")


if __name__ == "__main__":
    main()
