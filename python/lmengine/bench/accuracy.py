"""Accuracy tasks the engine scores offline, identical for every system of a CAP run.

* ``arith-units``: a deterministic generated set of arithmetic (+, -, x on small integers) and
  unit-conversion questions (m->cm, kg->g, h->min, min->s, km->m, L->mL) with exact integer
  answers. Each is asked through the model's chat template; the reply is generated greedily and
  scored correct when the last integer in it (commas ignored) equals the answer (small models
  restate the question before answering: "3 + 4 = 7").
* ``perplexity``: exp of the mean negative log-likelihood of each token given the preceding ones,
  over non-overlapping windows of the license texts shipped in /usr/share/common-licenses
  (no BOS; the first token of each window is context only).

Both work on token ids, so each peer receives the same ids and returns ids or log-likelihoods.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Question",
    "ARITH_DEFINITION",
    "PPL_DEFINITION",
    "make_questions",
    "score_answer",
    "license_text",
    "perplexity_windows",
    "window_nll",
]

ARITH_DEFINITION = (
    "arith-units accuracy = share of generated arithmetic / unit-conversion questions whose greedy "
    "chat reply's last integer equals the exact answer"
)
PPL_DEFINITION = (
    "perplexity = exp(mean NLL of each token given the preceding ones) over {windows} windows of "
    "{window} tokens of /usr/share/common-licenses text (no BOS, first token of a window is context)"
)
LICENSES = Path("/usr/share/common-licenses")

_UNITS = [
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilometers", "meters", 1000),
    ("liters", "milliliters", 1000),
]


@dataclass(frozen=True)
class Question:
    text: str
    answer: int
    kind: str


def make_questions(n: int, seed: int = 0) -> list[Question]:
    """n questions, the same for the same (n, seed) on every machine (Python's random is
    specified to be reproducible for a given seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = ("add", "sub", "mul", "units")[i % 4]
        if kind == "add":
            a, b = rng.randint(1, 20), rng.randint(1, 9)
            q, ans = f"What is {a} + {b}?", a + b
        elif kind == "sub":
            a = rng.randint(5, 20)
            b = rng.randint(1, a - 1)
            q, ans = f"What is {a} - {b}?", a - b
        elif kind == "mul":
            a, b = rng.randint(2, 9), rng.randint(2, 5)
            q, ans = f"What is {a} times {b}?", a * b
        else:
            big, small, factor = _UNITS[rng.randrange(len(_UNITS))]
            k = rng.randint(2, 9)
            q, ans = f"How many {small} are in {k} {big}?", k * factor
        out.append(Question(f"{q} Answer with just the number.", ans, kind))
    return out


_INT = re.compile(r"-?\d[\d,]*")


def score_answer(reply: str, answer: int) -> bool:
    found = _INT.findall(reply)
    if not found:
        return False
    try:
        return int(found[-1].replace(",", "")) == answer
    except ValueError:
        return False


def license_text() -> str:
    """The distinct license texts, in name order (several names are links to one file)."""
    seen, parts = set(), []
    if LICENSES.is_dir():
        for path in sorted(LICENSES.iterdir()):
            real = path.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                parts.append(real.read_text(errors="replace"))
    if not parts:
        raise FileNotFoundError(f"no license texts under {LICENSES} for the perplexity task")
    return "\n\n".join(parts)


def perplexity_windows(ids: list[int], window: int, n_windows: int) -> list[list[int]]:
    """n_windows non-overlapping windows of `window` tokens from the start of ids."""
    if len(ids) < window * n_windows:
        raise ValueError(f"text gives {len(ids)} tokens, need {window * n_windows}")
    return [ids[i * window : (i + 1) * window] for i in range(n_windows)]


def window_nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(ids[i+1] | ids[..i]) from logits [len(ids), vocab] and the count of terms."""
    x = np.asarray(logits[:-1], dtype=np.float64)
    target = np.asarray(ids[1:])
    m = x.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    nll = logz - x[np.arange(len(target)), target]
    return float(nll.sum()), int(len(target))
