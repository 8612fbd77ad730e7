"""Checks shared by the real-model tests (SmolLM2 in test_real_model, Gemma 3 in test_gemma3):
top-1 agreement of logits and HF's greedy continuation."""

from __future__ import annotations

import numpy as np


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions whose argmax agrees."""
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def hf_greedy_ids(model, ids: list[int], n: int) -> list[int]:
    """Exactly ``n`` greedy tokens from an HF model after ``ids`` (EOS does not stop it)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()
