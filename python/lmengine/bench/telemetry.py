"""Energy and device telemetry over a run: NVIDIA GPUs through NVML (nvidia-ml-py), CPU packages
through Linux RAPL (/sys/class/powercap). Either source may be missing; the meter then reports
energy as unknown (None) and says why, it never guesses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EnergyReading", "EnergyMeter", "gpu_devices", "rapl_domains"]

POWERCAP = Path("/sys/class/powercap")


@dataclass
class EnergyReading:
    seconds: float
    cpu_energy_j: float | None = None  # RAPL package domains summed; None if unreadable
    gpu_energy_j: float | None = None  # all visible GPUs summed; None without NVML
    gpu_power_w_mean: float | None = None
    gpu_memory_used_bytes: int | None = None  # at the end of the run, all GPUs
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def energy_j(self) -> float | None:
        parts = [e for e in (self.cpu_energy_j, self.gpu_energy_j) if e is not None]
        return sum(parts) if parts else None


def rapl_domains() -> list[Path]:
    """Top-level RAPL package domains whose energy counter this process can read."""
    out = []
    if not POWERCAP.is_dir():
        return out
    for d in sorted(POWERCAP.glob("intel-rapl:*")):
        if d.name.count(":") != 1:  # sub-domains (core, dram) are inside the package figure
            continue
        try:
            int((d / "energy_uj").read_text())
            out.append(d)
        except (OSError, ValueError):
            continue
    return out


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver or no device: telemetry is skipped
        return None


def gpu_devices() -> list[dict]:
    """Name, total memory and NVML handle of each visible NVIDIA GPU; [] without NVML."""
    nv = _nvml()
    if nv is None:
        return []
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name = nv.nvmlDeviceGetName(h)
        out.append(
            {
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).total),
                "handle": h,
            }
        )
    return out


class EnergyMeter:
    """``with EnergyMeter() as m: ...`` then ``m.reading``. RAPL counters wrap at
    max_energy_range_uj, handled for one wrap per run."""

    def __init__(self, use_gpu: bool = True):
        self._rapl = rapl_domains()
        self._gpus = gpu_devices() if use_gpu else []
        self._nv = _nvml() if self._gpus else None
        self.reading: EnergyReading | None = None

    def _rapl_now(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self._rapl]

    def _gpu_energy_mj(self) -> list[int | None]:
        out = []
        for g in self._gpus:
            try:
                out.append(int(self._nv.nvmlDeviceGetTotalEnergyConsumption(g["handle"])))
            except Exception:  # pre-Volta GPUs have no energy counter
                out.append(None)
        return out

    def _gpu_power_w(self) -> float:
        return sum(self._nv.nvmlDeviceGetPowerUsage(g["handle"]) for g in self._gpus) / 1000.0

    def __enter__(self) -> EnergyMeter:
        self._t0 = time.perf_counter()
        self._rapl0 = self._rapl_now() if self._rapl else []
        self._gpu0 = self._gpu_energy_mj() if self._gpus else []
        self._p0 = self._gpu_power_w() if self._gpus else None
        return self

    def __exit__(self, *exc) -> None:
        dt = time.perf_counter() - self._t0
        r = EnergyReading(seconds=dt)
        if self._rapl:
            total = 0.0
            for d, a, b in zip(self._rapl, self._rapl0, self._rapl_now()):
                if b < a:
                    b += int((d / "max_energy_range_uj").read_text())
                total += (b - a) / 1e6
            r.cpu_energy_j = total
            r.sources.append("rapl")
        else:
            r.notes.append("CPU energy unknown: no readable RAPL counter under /sys/class/powercap")
        if self._gpus:
            end = self._gpu_energy_mj()
            p1 = self._gpu_power_w()
            r.gpu_power_w_mean = (self._p0 + p1) / 2
            if all(e is not None for e in end + self._gpu0):
                r.gpu_energy_j = sum(b - a for a, b in zip(self._gpu0, end)) / 1000.0
                r.sources.append("nvml-energy")
            else:
                r.gpu_energy_j = r.gpu_power_w_mean * dt
                r.sources.append("nvml-power")
            r.gpu_memory_used_bytes = sum(
                int(self._nv.nvmlDeviceGetMemoryInfo(g["handle"]).used) for g in self._gpus
            )
        self.reading = r
