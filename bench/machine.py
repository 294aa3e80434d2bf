"""What machine a benchmark ran on: the CPU's name and the flags that decide kernels, and its measured
fp32 matmul rate (numpy, all cores), so every number can be read beside them; and the one latency loop
the benchmarks share."""

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
    a @ a
    best, t0 = float("inf"), time.perf_counter()
    while time.perf_counter() - t0 < 2.0:  # the best of many: the machine's rate, not its load
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return {"cpu": name.group(1).strip() if name else platform.processor(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "matmul_fp32_gflops": round(2 * 2048 ** 3 / best / 1e9, 1),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()}


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
