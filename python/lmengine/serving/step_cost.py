"""An online model of how long a step takes, so the scheduler can keep decodes fast.

A step's wall time is close to linear in what it holds (weights are read once per step whatever
the batch; each token adds its products; attention adds work per context position read)::

    seconds ~ a + b * decode_tokens + c * prefill_tokens + e * attended_positions / 1000

``StepCostModel`` fits (a, b, c, e) by least squares over the most recent steps, each coefficient
kept >= 0, and answers how many prompt tokens a step can take beside its decodes before its
predicted time passes a target. With a target near the wanted time per output token, decodes
never wait behind a long prompt: prompts are prefilled in the slack of each step (Sarathi-Serve's
stall-free batching, with the budget chosen by time instead of by a fixed token count).
"""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["StepCostModel"]


class StepCostModel:
    """Least-squares fit of step seconds on (1, decode tokens, prefill tokens, attended kpos)."""

    def __init__(self, window: int = 128, min_samples: int = 8):
        self.window = int(window)
        self.min_samples = int(min_samples)
        self._rows: deque[tuple[float, float, float, float]] = deque(maxlen=self.window)
        self._times: deque[float] = deque(maxlen=self.window)
        self._coef: np.ndarray | None = None

    @staticmethod
    def features(n_decode: int, n_prefill: int, attended: float) -> tuple[float, ...]:
        return (1.0, float(n_decode), float(n_prefill), float(attended) / 1000.0)

    def observe(self, n_decode: int, n_prefill: int, attended: float, seconds: float) -> None:
        """Record one step: its decode tokens, prompt tokens, positions attended, wall time."""
        self._rows.append(self.features(n_decode, n_prefill, attended))
        self._times.append(float(seconds))
        self._coef = None

    @property
    def ready(self) -> bool:
        return len(self._times) >= self.min_samples

    @property
    def coefficients(self) -> np.ndarray:
        """(a, b, c, e): seconds per step, per decode token, per prompt token, per 1000
        positions attended. Non-negative least squares by clipping and refitting."""
        if self._coef is None:
            X = np.asarray(self._rows, dtype=np.float64)
            y = np.asarray(self._times, dtype=np.float64)
            active = np.ones(X.shape[1], dtype=bool)
            coef = np.zeros(X.shape[1])
            for _ in range(X.shape[1]):
                sol, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
                coef[:] = 0.0
                coef[active] = sol
                if (coef >= 0).all():
                    break
                active &= coef > 0
                if not active.any():
                    coef[:] = 0.0
                    break
            self._coef = coef
        return self._coef

    def predict(self, n_decode: int, n_prefill: int, attended: float) -> float:
        return float(np.dot(self.coefficients, self.features(n_decode, n_prefill, attended)))

    def prefill_allowance(
        self, n_decode: int, n_prefill: int, attended: float, position: int, target: float
    ) -> int | None:
        """How many more prompt tokens, starting at ``position`` of their sequence, fit in a
        step that already holds the given work while its predicted time stays <= ``target``.
        None while the model has too few samples to say (the caller then does not limit)."""
        if not self.ready:
            return None
        a, b, c, e = self.coefficients
        slack = target - self.predict(n_decode, n_prefill, attended)
        if slack <= 0:
            return 0
        # Token i of the chunk attends position + i + 1 positions: n tokens cost
        # c*n + e*(n*position + n*(n+1)/2)/1000. Solve for the largest n within the slack.
        qa = e / 2000.0
        qb = c + e * (position + 0.5) / 1000.0
        if qa <= 0:
            return int(slack / qb) if qb > 0 else None
        n = (-qb + np.sqrt(qb * qb + 4 * qa * slack)) / (2 * qa)
        return max(0, int(n))
