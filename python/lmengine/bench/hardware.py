"""Hardware specs for S-MBU / S-MFU and cost: a GPU table from vendor datasheets, and CPU peaks
measured once by a built-in probe and cached under ``$LMENGINE_HOME/hardware/``.

Peak FLOP/s are *dense* (no 2:4 structured sparsity) per dtype; datasheets often print the
sparse figure, which is exactly twice the dense one. Prices are street estimates for cost
modelling, not vendor list prices; every number is overridable on the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lmengine.bench_cli import best_seconds, measure_gemm_peak

__all__ = [
    "HardwareSpec",
    "GPU_SPECS",
    "CPU_REFERENCE",
    "gpu_spec_for_name",
    "cpu_spec",
    "probe_cpu",
]

T = 1e12


@dataclass
class HardwareSpec:
    name: str
    kind: str  # "gpu" or "cpu"
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s (int8: OP/s)
    bandwidth: float  # bytes/s
    price_usd: float
    tdp_w: float
    source: str = ""
    extra: dict = field(default_factory=dict)

    def peak_for(self, dtype: str) -> float:
        """Peak for a compute dtype, falling back to the nearest wider one the table has."""
        for d in (dtype, *_FALLBACK.get(dtype, ())):
            if d in self.peak_flops:
                return self.peak_flops[d]
        raise KeyError(f"{self.name} has no peak for {dtype} (has {sorted(self.peak_flops)})")

    def to_dict(self) -> dict:
        return asdict(self)


_FALLBACK = {
    "int8": ("fp8", "bf16", "fp16", "fp32"),
    "fp8": ("bf16", "fp32"),
    "bf16": ("fp16", "fp32"),
    "fp16": ("bf16", "fp32"),
    "tf32": ("fp32",),
}

# Dense peaks, memory bandwidth and TDP from the vendors' datasheets:
#  H100 SXM5 80GB, H200 SXM 141GB: NVIDIA H100 / H200 Tensor Core GPU datasheets (FP32 67 TF,
#    TF32 989 TF*, BF16/FP16 1979 TF*, FP8/INT8 3958*, "* with sparsity"); 3.35 / 4.8 TB/s; 700 W.
#  A100 SXM 80GB: NVIDIA A100 datasheet (FP32 19.5 TF, TF32 156 TF, BF16/FP16 312 TF, INT8 624
#    TOPS dense); 2,039 GB/s; 400 W.
#  L40S: NVIDIA L40S datasheet (FP32 91.6 TF, TF32 183/366*, BF16/FP16 362/733*, FP8/INT8
#    733/1466*); 864 GB/s; 350 W.
#  B200 (HGX B200, per GPU): NVIDIA HGX B200 datasheet (TF32 2.2 PF*, FP16/BF16 4.5 PF*, FP8/INT8
#    9 P*, FP32 75 TF); 8 TB/s; 1,000 W.
#  MI300X: AMD Instinct MI300X datasheet (FP32 matrix 163.4 TF, TF32 653.7 TF, FP16/BF16 1307.4 TF,
#    FP8/INT8 2614.9 dense); 5.3 TB/s; 750 W.
# Prices (USD): A100-80GB 19k and H200 35k as in MoE-CAP's cost model; the others are street
# estimates of the same period.
GPU_SPECS: dict[str, HardwareSpec] = {
    s.name: s
    for s in [
        HardwareSpec(
            "H100-SXM",
            "gpu",
            {
                "fp32": 67 * T,
                "tf32": 494.7 * T,
                "bf16": 989.4 * T,
                "fp16": 989.4 * T,
                "fp8": 1978.9 * T,
                "int8": 1978.9 * T,
            },
            3.35e12,
            30_000,
            700,
            "NVIDIA H100 datasheet (SXM5), dense = sparse / 2",
        ),
        HardwareSpec(
            "H200",
            "gpu",
            {
                "fp32": 67 * T,
                "tf32": 494.7 * T,
                "bf16": 989.4 * T,
                "fp16": 989.4 * T,
                "fp8": 1978.9 * T,
                "int8": 1978.9 * T,
            },
            4.8e12,
            35_000,
            700,
            "NVIDIA H200 datasheet (SXM), dense = sparse / 2",
        ),
        HardwareSpec(
            "A100-SXM-80GB",
            "gpu",
            {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T, "int8": 624 * T},
            2.039e12,
            19_000,
            400,
            "NVIDIA A100 datasheet (SXM 80GB), dense",
        ),
        HardwareSpec(
            "L40S",
            "gpu",
            {
                "fp32": 91.6 * T,
                "tf32": 183 * T,
                "bf16": 362.05 * T,
                "fp16": 362.05 * T,
                "fp8": 733 * T,
                "int8": 733 * T,
            },
            0.864e12,
            9_000,
            350,
            "NVIDIA L40S datasheet, dense = sparse / 2",
        ),
        HardwareSpec(
            "B200",
            "gpu",
            {
                "fp32": 75 * T,
                "tf32": 1100 * T,
                "bf16": 2250 * T,
                "fp16": 2250 * T,
                "fp8": 4500 * T,
                "int8": 4500 * T,
            },
            8.0e12,
            40_000,
            1000,
            "NVIDIA HGX B200 datasheet (per GPU), dense = sparse / 2",
        ),
        HardwareSpec(
            "MI300X",
            "gpu",
            {
                "fp32": 163.4 * T,
                "tf32": 653.7 * T,
                "bf16": 1307.4 * T,
                "fp16": 1307.4 * T,
                "fp8": 2614.9 * T,
                "int8": 2614.9 * T,
            },
            5.3e12,
            15_000,
            750,
            "AMD Instinct MI300X datasheet, dense",
        ),
    ]
}

# MoE-CAP's CPU reference: a server CPU of about $7.2k at 350 W. Assumed to have 64 cores, and
# a run on n threads is charged n/64 of its price and power (one thread per core).
CPU_REFERENCE = {"price_usd": 7200.0, "tdp_w": 350.0, "cores": 64}

_NAME_PATTERNS = [
    ("H200", "H200"),
    ("H100", "H100-SXM"),
    ("A100", "A100-SXM-80GB"),
    ("L40S", "L40S"),
    ("B200", "B200"),
    ("MI300X", "MI300X"),
]


def gpu_spec_for_name(name: str) -> HardwareSpec | None:
    """Maps a device name as NVML/ROCm reports it ("NVIDIA H100 80GB HBM3") to a table row."""
    upper = name.upper()
    for pattern, key in _NAME_PATTERNS:
        if pattern in upper:
            return GPU_SPECS[key]
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe_bandwidth(threads: int, n_bytes: int = 128 << 20, reps: int = 12) -> float:
    """Copy bandwidth, bytes/s counting read + write, with `threads` copies of disjoint slices
    in parallel (numpy releases the GIL while copying); best of reps."""
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if p.size]
    with ThreadPoolExecutor(threads) as ex:
        copy = lambda: list(ex.map(lambda b: np.copyto(dst[b[0] : b[1]], src[b[0] : b[1]]), bounds))  # noqa: E731
        return 2 * n_bytes / best_seconds(copy, reps)


def _probe_gemm_fp32(n: int = 1024, reps: int = 12) -> float:
    """fp32 GEMM FLOP/s through numpy's BLAS with its own threads; best of reps."""
    return measure_gemm_peak(n, reps) * 1e9


def _probe_int8(
    threads: int, rows: int = 256, k: int = 2048, tokens: int = 64, reps: int = 20
) -> float:
    """8-bit products through the engine's own Q8_0 kernel (int8 weights x int8 activations), one
    matrix per thread in parallel; OP/s = 2 * rows * k * tokens per call; best of reps."""
    from lmengine import _core

    q8_0 = 8
    rng = np.random.default_rng(0)
    row_bytes = _core.dtype_row_bytes(q8_0, k)
    # Random bytes are valid Q8_0 blocks except for NaN/Inf scales: keep the fp16 scale finite.
    w = rng.integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    w.reshape(rows, -1, 34)[:, :, 1] &= 0x3B
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    with ThreadPoolExecutor(threads) as ex:
        run = lambda: list(ex.map(lambda _: _core.quant_matmul(q8_0, w, k, x), range(threads)))  # noqa: E731
        return threads * 2 * rows * k * tokens / best_seconds(run, reps)


def probe_cpu(threads: int) -> dict:
    """Measures the CPU peaks the metrics divide by (takes a few seconds)."""
    out = {
        "bandwidth": _probe_bandwidth(threads),
        "fp32": _probe_gemm_fp32(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "threads": threads,
        "method": "copy: numpy copyto of 128 MiB split over threads, 2*bytes/best of 12; fp32: "
        "numpy 1024^3 GEMM, best of 12; int8: lmengine Q8_0 matmul 256x2048 x 64 tokens per "
        "thread, best of 20 (short repetitions: the best one is least disturbed by other load)",
    }
    try:
        out["int8"] = _probe_int8(threads)
    except Exception as e:  # the compiled core is optional for the probe: report what is missing
        out["int8_error"] = f"{type(e).__name__}: {e}"
    return out


def _cache_path(threads: int) -> Path:
    from lmengine import _core
    from lmengine.registry import model_home

    key = f"{_cpu_model()}|{threads}|{_core.simd()}|{os.cpu_count()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return model_home() / "hardware" / f"cpu-probe-{digest}.json"


def cpu_spec(
    threads: int,
    *,
    reprobe: bool = False,
    price_usd: float | None = None,
    tdp_w: float | None = None,
) -> HardwareSpec:
    """The CPU as a HardwareSpec: peaks from the cached probe (measured on first use), price and
    power scaled from CPU_REFERENCE to the threads used unless given."""
    path = _cache_path(threads)
    probe = None
    if path.is_file() and not reprobe:
        try:
            probe = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            probe = None
    if probe is None:
        probe = probe_cpu(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(probe, indent=2))
        tmp.replace(path)
        probe["cached"] = False
    else:
        probe["cached"] = True
    share = min(1.0, threads / CPU_REFERENCE["cores"])
    peaks = {"fp32": probe["fp32"]}
    if "int8" in probe:
        # Quantized weights are multiplied with 8-bit activations (decode) or, for prompt chunks,
        # with fp32 activations over dequantized panels: the peak for their work is the faster
        # of the two measured rates.
        peaks["int8"] = max(probe["int8"], probe["fp32"])
    return HardwareSpec(
        name=f"CPU {_cpu_model()} ({threads} threads)",
        kind="cpu",
        peak_flops=peaks,
        bandwidth=probe["bandwidth"],
        price_usd=price_usd if price_usd is not None else CPU_REFERENCE["price_usd"] * share,
        tdp_w=tdp_w if tdp_w is not None else CPU_REFERENCE["tdp_w"] * share,
        source=f"measured by lmengine's probe ({probe['method']}); cache {path}",
        extra={"probe": probe, "cache_path": str(path)},
    )
