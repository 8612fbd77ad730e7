"""Runs one peer system (llama.cpp through llama-cpp-python, or HF transformers) on a CAP workload,
in its own process: ``python cap_peer_worker.py CONFIG.json``; prints one RESULT line of JSON.

Standalone on purpose: llama.cpp runs under a side venv's python that has numpy and llama_cpp
but not lmengine, so this file imports only the standard library and numpy at module level and
loads the telemetry module by path. Every system receives the same token ids from the driver
(lmengine.bench.cap_run) and returns token ids, log-likelihoods and timings; the driver scores.

Config keys: system, model (GGUF path), threads, n_ctx, eos_ids, questions (list of prompt ids),
question_max_tokens, ppl_windows (list of ids), batch_sizes, prompts (ids, one per request of
the largest batch), output_tokens, telemetry_path.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

RESULT_PREFIX = "CAP_RESULT "


def _load_telemetry(path: str):
    spec = importlib.util.spec_from_file_location("_cap_telemetry", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_cap_telemetry"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _log_softmax_nll(logits, ids) -> tuple[float, int]:
    import numpy as np

    x = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    target = np.asarray(ids[1:])
    m = x.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return float((logz - x[np.arange(len(target)), target]).sum()), int(len(target))


class LlamaCppPeer:
    """Requests one after another: llama-cpp-python's Llama runs one sequence per context."""

    name = "llama.cpp"

    def __init__(self, cfg):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.cfg = cfg
        self.version = f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}"
        self.llm = self._make(logits_all=False)
        self.n_vocab = self.llm.n_vocab()

    def _make(self, logits_all):
        c = self.cfg
        return self.llama_cpp.Llama(
            model_path=c["model"],
            n_threads=c["threads"],
            n_threads_batch=c["threads"],
            n_ctx=c["n_ctx"],
            n_batch=512,
            flash_attn=True,
            logits_all=logits_all,
            verbose=False,
        )

    def _argmax(self):
        import numpy as np

        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def generate_one(self, ids, n, eos_ids):
        """Greedy; returns (tokens, ttft_s, decode_s)."""
        t0 = time.perf_counter()
        self.llm.reset()
        self.llm.eval(list(ids))
        out = [self._argmax()]
        t1 = time.perf_counter()
        while len(out) < n and out[-1] not in eos_ids:
            self.llm.eval([out[-1]])
            out.append(self._argmax())
        return out, t1 - t0, time.perf_counter() - t1

    def answers(self, questions, n, eos_ids):
        return [self.generate_one(q, n, set(eos_ids))[0] for q in questions]

    def run_batch(self, prompts, n):
        ttft, decode = [], []
        for ids in prompts:
            _, a, b = self.generate_one(ids, n, set())
            ttft.append(a)
            decode.append(b)
        return ttft, decode

    def perplexity(self, windows):
        ppl_llm = self._make(logits_all=True)
        total, count = 0.0, 0
        for ids in windows:
            ppl_llm.reset()
            ppl_llm.eval(list(ids))
            s, c = _log_softmax_nll(ppl_llm.scores[: len(ids)], ids)
            total, count = total + s, count + c
        del ppl_llm
        return total, count


class HFPeer:
    """HF transformers with the GGUF dequantized to fp32; batched generate for equal-length
    prompts, questions one at a time (their lengths differ)."""

    name = "transformers"

    def __init__(self, cfg):
        from pathlib import Path

        import torch
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        torch.set_num_threads(cfg["threads"])
        self.torch = torch
        p = Path(cfg["model"])
        self.model = AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, dtype=torch.float32
        ).eval()
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"

    def _generate(self, prompts, n, eos_ids, exact):
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch

        class FirstCall(LogitsProcessor):
            t = None

            def __call__(self, input_ids, scores):
                if FirstCall.t is None:
                    FirstCall.t = time.perf_counter()
                return scores

        x = torch.tensor([list(p) for p in prompts], dtype=torch.long)
        kwargs = {"min_new_tokens": n} if exact else {"eos_token_id": list(eos_ids)}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([FirstCall()]),
                **kwargs,
            )
        t_end = time.perf_counter()
        return out[:, x.shape[1] :].tolist(), FirstCall.t - t0, t_end - FirstCall.t

    def answers(self, questions, n, eos_ids):
        out = []
        for q in questions:
            toks = self._generate([q], n, eos_ids, exact=False)[0][0]
            cut = next((i + 1 for i, t in enumerate(toks) if t in eos_ids), len(toks))
            out.append(toks[:cut])
        return out

    def run_batch(self, prompts, n):
        _, ttft, decode = self._generate(prompts, n, [], exact=True)
        return [ttft] * len(prompts), [decode] * len(prompts)

    def perplexity(self, windows):
        torch = self.torch
        total, count = 0.0, 0
        for ids in windows:
            with torch.inference_mode():
                logits = self.model(torch.tensor([list(ids)])).logits[0].float().numpy()
            s, c = _log_softmax_nll(logits, ids)
            total, count = total + s, count + c
        return total, count


PEERS = {"llamacpp": LlamaCppPeer, "hf": HFPeer}


def run(cfg: dict) -> dict:
    telemetry = _load_telemetry(cfg["telemetry_path"])
    t0 = time.perf_counter()
    peer = PEERS[cfg["system"]](cfg)
    result = {"load_s": time.perf_counter() - t0, "version": peer.version, "runs": []}
    eos = set(cfg["eos_ids"])
    result["answers"] = peer.answers(cfg["questions"], cfg["question_max_tokens"], eos)
    result["ppl_nll"], result["ppl_count"] = peer.perplexity(cfg["ppl_windows"])
    n = cfg["output_tokens"]
    peer.run_batch(cfg["prompts"][:1], 2)  # warm-up
    for b in cfg["batch_sizes"]:
        with telemetry.EnergyMeter() as meter:
            t = time.perf_counter()
            ttft, decode = peer.run_batch(cfg["prompts"][:b], n)
            wall = time.perf_counter() - t
        r = meter.reading
        result["runs"].append(
            {
                "batch_size": b,
                "ttft_s": ttft,
                "decode_s": decode,
                "wall_s": wall,
                "output_tokens": b * n,
                "energy_j": r.energy_j,
                "energy_sources": r.sources,
                "gpu_memory_used_bytes": r.gpu_memory_used_bytes,
            }
        )
    return result


def main() -> None:
    cfg = json.loads(open(sys.argv[1]).read())
    try:
        result = run(cfg)
    except ImportError as e:
        result = {"error": f"{cfg['system']} is not installed for {sys.executable} ({e})"}
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
