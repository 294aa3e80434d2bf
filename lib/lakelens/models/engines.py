"""Inference engines: an open_clip model's two towers run in torch (fp32, bf16, fp16 on a GPU) or as ONNX
graphs in ONNX Runtime (fp32, int8), cached per process and on disk. This module is the choice: the
engines' names, `load` (one engine per process and setting) and `get` (device and cores resolved first).
The parts live beside it, and their names are importable from here too:

- models.devices: the CPU or which GPU, the Spark task's cores;
- models.cpu: what the CPU's flags decide (int8 weight bits, native bf16);
- models.torch_engine: TorchEngine and its bf16 copy and probe;
- models.onnx_graph: what the ONNX graphs share (opset, traced towers, sessions, input feeds);
- models.onnx_export: the graphs' export, on-disk cache and its keys, publishing;
- models.int8_calibration: the int8 image tower's quantisation, calibration and probe check;
- models.onnx_engine: OnnxEngine.
"""

from __future__ import annotations

import functools
import json
import logging

from lakelens.config import CHOICES, ConfigError, EmbedConfig
from lakelens.models import registry as models
from lakelens.models.cpu import VNNI_FLAGS, bf16_supported, cpu_flags, int8_weight_bits, machine_int8_weight_bits
from lakelens.models.devices import choose_device, cuda_available, task_cpus, task_gpu_addresses
from lakelens.models.int8_calibration import CALIBRATION_IMAGES, INT8_BATCH, probe_images
from lakelens.models.onnx_engine import OnnxEngine
from lakelens.models.onnx_export import EXPORTS, cache_key, onnx_graphs, weights_fingerprint
from lakelens.models.registry import ModelSpec
from lakelens.models.torch_engine import TorchEngine, bf16_copy, time_bf16

# the parts' names that code, tests and bench/ use as engines.NAME (a setting a test changes, such as
# int8_calibration.INT8_MIN_COSINE, is changed where it is read)
__all__ = ["VNNI_FLAGS", "bf16_supported", "cpu_flags", "int8_weight_bits", "machine_int8_weight_bits", "choose_device",
           "cuda_available", "task_cpus", "task_gpu_addresses", "CALIBRATION_IMAGES", "INT8_BATCH", "probe_images",
           "OnnxEngine", "EXPORTS", "cache_key", "onnx_graphs", "weights_fingerprint", "TorchEngine", "bf16_copy",
           "time_bf16", "ENGINES", "DEFAULT_ENGINE", "check_engine", "load", "get"]

ENGINES: tuple = CHOICES["embed.engine"]
# embed.engine's default: the fastest engine whose parity tests pass (per-image cosine >= 0.999 against
# torch fp32, and the demo's Recall@10 within one point): BENCHMARKS.md.
DEFAULT_ENGINE = EmbedConfig.engine

log = logging.getLogger(__name__)


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"embed.engine: {engine!r} is not one of {', '.join(ENGINES)}")


@functools.lru_cache(maxsize=4)
def load(spec: ModelSpec, engine: str = DEFAULT_ENGINE, device: str = "cpu", threads: int = 1,
         cache_dir: str = "", fingerprint: str = ""):
    """One engine per process and setting: Spark's reused Python workers keep it between tasks.
    `device` is a resolved device (choose_device); on a GPU every engine runs torch with fp16 autocast."""
    check_engine(engine)
    if device == "cpu" and engine.startswith("onnx"):
        return OnnxEngine(spec, quantized=engine == "onnx-int8", threads=max(1, threads), cache_dir=cache_dir or None)
    import torch

    loaded = models.load(spec)
    if device != "cpu":
        return TorchEngine(loaded, device, torch.float16, name=f"{engine} (cuda fp16)")
    if engine == "torch-bf16":
        if not bf16_supported():
            log.warning("embed.engine torch-bf16: this CPU has no native bf16 kernels (emulated bf16 is far "
                        "slower than fp32); running fp32 instead")
            return TorchEngine(loaded, name=engine, threads=threads)
        bf16_model = bf16_copy(loaded.model)
        timing = time_bf16(loaded, threads, bf16_model=bf16_model)
        faster = timing["bf16_ms"] < timing["fp32_ms"]
        log.warning("embed.engine torch-bf16: on this CPU a probe batch takes %.1f ms in bf16 and %.1f ms in fp32; "
                    "running %s", timing["bf16_ms"], timing["fp32_ms"], "bf16" if faster else "fp32 (bf16 is slower here)")
        eng = TorchEngine(loaded, dtype=torch.bfloat16 if faster else None, name=engine, threads=threads,
                          bf16_model=bf16_model if faster else None)
        eng.timing = timing
        return eng
    return TorchEngine(loaded, name=engine, threads=threads)


def get(spec: ModelSpec, engine: str = DEFAULT_ENGINE, device: str = "auto", threads: int | None = None,
        cache_dir: str = ""):
    """Resolve device and threads (from the Spark task, if any) and return the cached engine. A changed
    checkpoint file gives a new cache entry, so a long-lived worker does not keep serving stale graphs."""
    resolved = choose_device(cuda_available(), task_gpu_addresses(), device)
    fp = json.dumps(weights_fingerprint(spec), sort_keys=True)
    return load(spec, engine, resolved, threads or task_cpus(), str(cache_dir or ""), fp)
