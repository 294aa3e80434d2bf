"""What machine a benchmark ran on: the CPU's name and the flags that decide kernels (AVX2, AVX-512,
VNNI, AVX512-BF16, AMX), and its measured matrix product rates (numpy fp32; torch fp32, bf16 and int8;
all cores), so every number can be read beside them; and the one latency loop the benchmarks share."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time

import numpy as np
from tqdm import tqdm

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def describe() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", text)
    found = re.search(r"Flags:\s*(.+)", text)
    flags = set(found.group(1).split()) if found else set()
    a = np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)
    return {"cpu": name.group(1).strip() if name else platform.processor(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "matmul_fp32_gflops": best_rate(lambda: a @ a, 2 * 2048 ** 3, 2.0),
            **torch_rates(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()}


def best_rate(fn, ops: float, seconds: float = 1.0) -> float:
    """G(FL)OP/s of `fn` doing `ops` operations: the best of as many calls as fit in `seconds` after one
    warm-up (the machine's rate, not its load)."""
    fn()
    best, t0 = float("inf"), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(ops / best / 1e9, 1)


def torch_rates(n: int = 2048) -> dict:
    """Matrix product rates in torch (the kernels the engines use), all threads: fp32, bf16 and int8
    (int8 x int8 -> int32, `torch._int_mm`: VNNI where the CPU has it), in G(FL)OP/s; None when this
    torch has no such kernel here."""
    try:
        import torch
    except ImportError:
        return {}
    a = torch.randn(n, n)
    out = {"torch_threads": torch.get_num_threads(),
           "torch_matmul_fp32_gflops": best_rate(lambda: a @ a, 2 * n ** 3)}
    b = a.bfloat16()
    out["torch_matmul_bf16_gflops"] = best_rate(lambda: b @ b, 2 * n ** 3)
    q = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    try:
        out["torch_matmul_int8_gops"] = best_rate(lambda: torch._int_mm(q, q), 2 * n ** 3)
    except (RuntimeError, AttributeError):
        out["torch_matmul_int8_gops"] = None
    return out


def latencies(fn, items, label: str | None = None) -> dict:
    """Call fn on each item in turn: p50, p99 and mean milliseconds (tqdm progress when labelled)."""
    times = []
    for item in tqdm(items, desc=label, leave=False, disable=label is None):
        t0 = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - t0) * 1000)
    t = np.array(times)
    return {"p50_ms": round(float(np.percentile(t, 50)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3),
            "mean_ms": round(float(t.mean()), 3)}
