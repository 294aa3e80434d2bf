"""What machine a benchmark ran on: the CPU's name and the flags that decide kernels (AVX2, AVX-512,
VNNI, AVX512-BF16, AMX), and its measured matrix product rates (numpy fp32; torch fp32, bf16 and int8;
all cores), so every number can be read beside them; the one latency loop the benchmarks share; and the
--smoke switch every benchmark takes (`smoke`)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

SMOKE = "LAKELENS_BENCH_SMOKE"  # set by --smoke, so the processes a benchmark starts know it too
SMOKE_HELP = "a tiny run of every code path, not a measurement (make bench-smoke); results go to a temp folder"
RESULTS = Path(__file__).resolve().parent / "results"
# training pairs of a smoke run's fine-tuning: a tenth is held out by a hash of the (temp) paths, and the
# fine-tuner needs 2 held out (at 120 pairs, fewer is a 1 in 20,000 draw)
SMOKE_PAIRS = 120
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def smoke(args, **tiny) -> bool:
    """True when the run was asked for with --smoke (args.smoke): then every `tiny` setting replaces its
    argument, and every argument that names a file under bench/results or a work folder under build/
    (a real run's) names one in a temp folder instead, so a smoke run never writes over a measurement."""
    if not getattr(args, "smoke", False):
        return in_smoke()
    os.environ[SMOKE] = "1"
    for key, value in tiny.items():
        setattr(args, key, value)
    guarded = (str(RESULTS), str(RESULTS.parents[1] / "build"))
    scratch = Path(tempfile.gettempdir()) / "lakelens-bench-smoke"
    scratch.mkdir(exist_ok=True)
    for key, value in vars(args).items():
        if isinstance(value, str) and value.startswith(guarded):
            setattr(args, key, str(scratch / Path(value).name))
            print(f"[smoke] --{key.replace('_', '-')} {getattr(args, key)} (not {value})", flush=True)
    return True


def in_smoke() -> bool:
    """Inside a --smoke run (this process or the benchmark that started it)."""
    return os.environ.get(SMOKE) == "1"


def side(n: int) -> int:
    """The side of the square matrices a rate is measured on: `n`, or 256 in a smoke run."""
    return 256 if in_smoke() else n


def describe() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", text)
    found = re.search(r"Flags:\s*(.+)", text)
    flags = set(found.group(1).split()) if found else set()
    n = side(2048)
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    return {"cpu": name.group(1).strip() if name else platform.processor(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "matmul_fp32_gflops": best_rate(lambda: a @ a, 2 * n ** 3, 2.0),
            **torch_rates(side(2048)), "ort_matmul_int8_gops": ort_int8_rate(side(2048)),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            **({"cpu_view": os.environ["LAKELENS_CPU_VIEW"]} if os.environ.get("LAKELENS_CPU_VIEW") else {})}


def best_rate(fn, ops: float, seconds: float = 1.0) -> float:
    """G(FL)OP/s of `fn` doing `ops` operations: the best of as many calls as fit in `seconds` after one
    warm-up (the machine's rate, not its load); one call in a smoke run."""
    fn()
    best, t0 = float("inf"), time.perf_counter()
    seconds = 0.0 if in_smoke() else seconds
    while best == float("inf") or time.perf_counter() - t0 < seconds:
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


def int8_product(weights: np.ndarray, rows: int, threads: int = 1):
    """An ONNX Runtime session of one MatMulInteger, A (rows x K, uint8) x `weights` (K x N, int8) -> int32:
    the kernel family the int8 engine's graphs run (VPDPBUSD with VNNI, VPMADDUBSW + VPMADDWD on AVX2).
    Run it with {"A": uint8 array}."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k, n = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "int8_product",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [rows, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [rows, n])],
        [helper.make_tensor("B", TensorProto.INT8, [k, n], weights.astype(np.int8).tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_int8_rate(n: int = 2048, seconds: float = 1.0) -> float | None:
    """G OP/s of ONNX Runtime's uint8 x int8 product (`int8_product`, all threads), where torch's `_int_mm`
    may have no fast kernel at all (it falls back to a slow loop without AVX512-VNNI)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    w = rng.integers(-64, 64, (n, n), dtype=np.int8)  # 7-bit weights: no pair saturates on any kernel
    sess = int8_product(w, n, os.cpu_count() or 1)
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    return best_rate(lambda: sess.run(None, {"A": a}), 2 * n ** 3, seconds)


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


class ProcessTreeCPU:
    """CPU-seconds of a process and all its descendants, by kind (the JVM, Spark's Python workers, the
    Python driver), sampled from /proc every `every` seconds on a thread while the process runs (Linux):
    where a Spark command's core time goes. `window(a, b)` is the cores each kind kept busy between
    fractions a and b of the run's wall time."""

    def __init__(self, pid: int, every: float = 0.5):
        import threading

        self.pid, self.every, self.timeline, self.seen = pid, every, [], {}
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    @staticmethod
    def _kind(pid: int, root: int) -> str:
        argv = open(f"/proc/{pid}/cmdline").read().split("\0")
        if os.path.basename(argv[0]) == "java":
            return "jvm"
        if any(a.startswith("pyspark.") for a in argv):  # pyspark.daemon and the workers it forks
            return "python_workers"
        return "python_driver" if pid == root else "other"

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid = int(self._stat(int(entry))[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def _loop(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        while not self._reaped():
            for p in self._tree():
                try:
                    fields = self._stat(p)
                    self.seen[p] = (self._kind(p, self.pid), (int(fields[11]) + int(fields[12])) / hz)
                except (OSError, IndexError, ValueError):
                    continue  # gone since the listing: its last sample stands
            totals: dict[str, float] = {}
            for kind, seconds in self.seen.values():
                totals[kind] = totals.get(kind, 0.0) + seconds
            self.timeline.append((time.perf_counter() - self.t0, totals))
            time.sleep(self.every)

    @staticmethod
    def _stat(pid: int) -> list[str]:
        """/proc/PID/stat's fields after the command name (state, ppid, ...; utime and stime at 11, 12)."""
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()

    def _reaped(self) -> bool:  # gone, or a zombie whose parent has not waited yet
        try:
            return self._stat(self.pid)[0] == "Z"
        except OSError:
            return True

    def stop(self) -> dict:
        self.thread.join()
        wall, last = self.timeline[-1] if self.timeline else (None, {})
        return {"cpu_seconds": {k: round(v, 1) for k, v in sorted(last.items())},
                "wall_s": None if wall is None else round(wall, 1),
                "cores_busy_40_to_90_percent_of_run": self.window(0.4, 0.9)}

    def window(self, a: float, b: float) -> dict:
        if len(self.timeline) < 3:
            return {}
        end = self.timeline[-1][0]
        first = min(self.timeline, key=lambda r: abs(r[0] - a * end))
        last = min(self.timeline, key=lambda r: abs(r[0] - b * end))
        span = last[0] - first[0]
        if span <= 0:
            return {}
        return {k: round((last[1].get(k, 0.0) - first[1].get(k, 0.0)) / span, 2) for k in sorted(last[1])}
