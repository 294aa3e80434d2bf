"""Inference engines: an open_clip model's two towers run in torch (fp32, bf16, fp16 on a GPU) or as ONNX graphs in ONNX Runtime (fp32, int8), cached per process and on disk."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from . import models
from .config import CHOICES, ConfigError
from .models import ModelSpec

ENGINES: tuple = CHOICES["embed.engine"]
DEVICES: tuple = CHOICES["embed.device"]
# The fastest engine whose parity test holds at cosine >= 0.99999 against torch (BENCHMARKS.md).
DEFAULT_ENGINE = "onnx"
ONNX_OPSET = 17
EXPORT_FORMAT = 1  # bump when the exported graphs change, so old caches are not reused
# int8: weight-only 8-bit MatMul (MatMulNBits, symmetric blocks of 32) whose activations ONNX Runtime
# quantises per block of 32 values too (accuracy_level 4: int8 dot products). quantize_dynamic's one
# scale per activation tensor lost too much (cosine 0.986 against fp32 on ViT-B-32, BENCHMARKS.md).
INT8_OPTIONS = {"bits": 8, "block_size": 32, "is_symmetric": True, "accuracy_level": 4}
EXPORTS: Counter = Counter()  # (cache folder, variant) -> exports done by this process; tests read it

log = logging.getLogger(__name__)
_EXPORT_LOCK = threading.Lock()


# --- device --------------------------------------------------------------------------------------
def choose_device(cuda_available: bool, task_gpu_addresses: Sequence[str] | None = None,
                  requested: str = "auto") -> str:
    """'cpu' or 'cuda:N'. A GPU that Spark assigned to the task wins over cuda:0; `requested` is
    embed.device (auto | cpu | cuda)."""
    if requested not in DEVICES:
        raise ConfigError(f"embed.device: {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    if not cuda_available:
        if requested == "cuda":
            raise ConfigError("embed.device: cuda was asked for, but torch sees no CUDA device here")
        return "cpu"
    addresses = [a for a in (task_gpu_addresses or []) if str(a).strip()]
    if addresses:
        try:
            return f"cuda:{int(str(addresses[0]).strip())}"
        except ValueError:
            raise ConfigError(f"spark gpu resource: address {addresses[0]!r} is not a CUDA device index") from None
    return "cuda:0"


def task_gpu_addresses() -> list[str]:
    """The GPU addresses Spark assigned to the running task (spark.task.resource.gpu.amount); [] outside one."""
    try:
        from pyspark import TaskContext
    except ImportError:
        return []
    ctx = TaskContext.get()
    gpu = ctx.resources().get("gpu") if ctx is not None else None
    return list(gpu.addresses) if gpu is not None else []


def task_cpus() -> int:
    """Cores given to the running Spark task (spark.task.cpus), else every core of the machine."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
    except ImportError:
        ctx = None
    return max(1, ctx.cpus() if ctx is not None else (os.cpu_count() or 1))


def bf16_supported() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# --- torch ---------------------------------------------------------------------------------------
class TorchEngine:
    """The open_clip model itself; autocast to bf16 (CPU) or fp16 (GPU) when `dtype` is given."""

    def __init__(self, loaded: models.LoadedModel, device: str = "cpu", dtype=None, name: str = "torch"):
        import torch

        self.name, self.device, self.dtype = name, device, dtype
        self.model = loaded.model if device == "cpu" else loaded.model.to(device)
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def _run(self, fn, x) -> np.ndarray:
        import torch

        x = torch.as_tensor(x).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=self.dtype,
                                                    enabled=self.dtype is not None):
            return fn(x, normalize=True).float().cpu().numpy()

    def encode_image(self, images) -> np.ndarray:
        return self._run(self.model.encode_image, images)

    def encode_text(self, tokens) -> np.ndarray:
        return self._run(self.model.encode_text, tokens)


# --- ONNX export and on-disk cache ---------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("LAKELENS_CACHE_DIR") or Path.home() / ".cache" / "lakelens"
    return Path(root) / "onnx"


def weights_fingerprint(spec: ModelSpec) -> dict:
    """What identifies the weights: the spec, plus size and mtime of a local checkpoint file."""
    out = {"spec": spec.key}
    stamp = models.weights_stamp(spec)  # the same stamp that keys models.load's cache
    if stamp:
        out.update(size=stamp[0], mtime_ns=stamp[1])
    return out


def cache_key(spec: ModelSpec) -> str:
    import open_clip
    import torch

    facts = {**weights_fingerprint(spec), "torch": torch.__version__, "open_clip": open_clip.__version__,
             "opset": ONNX_OPSET, "format": EXPORT_FORMAT}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)[:40]
    return f"{safe}-{digest}"


def _towers(model):
    import torch
    import torch.nn.functional as F

    class Tower(torch.nn.Module):
        """One encoder of the model (encode_image or encode_text) with its output normalised."""

        def __init__(self, encode: str):
            super().__init__()
            self.m, self.encode = model, encode

        def forward(self, x):
            return F.normalize(getattr(self.m, self.encode)(x), dim=-1)

    return Tower("encode_image").eval(), Tower("encode_text").eval()


def _export_fp32(loaded: models.LoadedModel, folder: Path) -> None:
    import torch

    image, text = _towers(loaded.model)
    sample_image = torch.zeros(2, 3, loaded.image_size, loaded.image_size)
    sample_tokens = loaded.tokenizer(["a photo", "an image of something"])
    # The legacy TorchScript exporter needs no onnxscript; nn.MultiheadAttention's fused fast path has
    # no ONNX symbol, so it is switched off while tracing (the math is the same).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            for module, sample, inp, path in ((image, sample_image, "image", "image.onnx"),
                                              (text, sample_tokens, "tokens", "text.onnx")):
                torch.onnx.export(module, (sample,), str(folder / path), dynamo=False, opset_version=ONNX_OPSET,
                                  input_names=[inp], output_names=["embedding"],
                                  dynamic_axes={inp: {0: "batch"}, "embedding": {0: "batch"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export_int8(fp32: Path, folder: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for name in ("image.onnx", "text.onnx"):
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / name)), **INT8_OPTIONS)
        quantizer.process()
        quantizer.model.save_model_to_file(str(folder / name), False)


def _publish(root: Path, variant: str, build, meta: dict) -> Path:
    """Build `variant` in a private temp folder and rename it into place: two workers exporting at once
    both succeed, one rename wins, and no reader ever sees a half-written graph."""
    final = root / variant
    if (final / "meta.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{variant}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _EXPORT_LOCK:  # torch.onnx.export keeps global state: one export at a time per process
            build(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks it complete
        EXPORTS[(str(root), variant)] += 1
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a lost race: a broken leftover; replace it
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def onnx_graphs(loaded: models.LoadedModel, quantized: bool = False, cache_dir: str | Path | None = None) -> Path:
    """The folder holding image.onnx and text.onnx for this model, exported (and quantised) once."""
    spec = loaded.spec
    root = Path(cache_dir or default_cache_dir()) / cache_key(spec)
    meta = {**weights_fingerprint(spec), "image_size": loaded.image_size, "dim": loaded.dim, "opset": ONNX_OPSET}
    fp32 = _publish(root, "fp32", lambda tmp: _export_fp32(loaded, tmp), {**meta, "precision": "fp32"})
    if not quantized:
        return fp32
    return _publish(root, "int8", lambda tmp: _export_int8(fp32, tmp), {**meta, "precision": "int8", **INT8_OPTIONS})


class OnnxEngine:
    """ONNX Runtime sessions over the exported towers; the text session is opened on first use."""

    def __init__(self, loaded: models.LoadedModel, quantized: bool = False, threads: int = 1,
                 cache_dir: str | Path | None = None):
        self.name = "onnx-int8" if quantized else "onnx"
        self.precision, self.device, self.threads = ("int8" if quantized else "fp32"), "cpu", threads
        self.folder = onnx_graphs(loaded, quantized, cache_dir)
        self._image = self._session("image.onnx")
        self._text = None

    def _session(self, name: str):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads  # the task's cores; Spark runs other tasks beside it
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads would spin on cores the decode threads need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(self.folder / name), opts, providers=["CPUExecutionProvider"])

    def encode_image(self, images) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        return self._image.run(None, {"image": x})[0]

    def encode_text(self, tokens) -> np.ndarray:
        if self._text is None:
            self._text = self._session("text.onnx")
        return self._text.run(None, {"tokens": np.asarray(tokens, dtype=np.int64)})[0]


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"embed.engine: {engine!r} is not one of {', '.join(ENGINES)}")


# --- choice and per-process cache ----------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load(spec: ModelSpec, engine: str = DEFAULT_ENGINE, device: str = "cpu", threads: int = 1,
         cache_dir: str = "", fingerprint: str = ""):
    """One engine per process and setting: Spark's reused Python workers keep it between tasks.
    `device` is a resolved device (choose_device); on a GPU every engine runs torch with fp16 autocast."""
    import torch

    check_engine(engine)
    loaded = models.load(spec)
    if device != "cpu":
        return TorchEngine(loaded, device, torch.float16, name=f"{engine} (cuda fp16)")
    if engine == "torch":
        return TorchEngine(loaded)
    if engine == "torch-bf16":
        if bf16_supported():
            return TorchEngine(loaded, dtype=torch.bfloat16, name=engine)
        log.warning("embed.engine torch-bf16: this CPU has no native bf16 kernels (emulated bf16 is far "
                    "slower than fp32); running fp32 instead")
        return TorchEngine(loaded, name=engine)
    return OnnxEngine(loaded, quantized=engine == "onnx-int8", threads=max(1, threads), cache_dir=cache_dir or None)


def get(spec: ModelSpec, engine: str = DEFAULT_ENGINE, device: str = "auto", threads: int | None = None,
        cache_dir: str = ""):
    """Resolve device and threads (from the Spark task, if any) and return the cached engine. A changed
    checkpoint file gives a new cache entry, so a long-lived worker does not keep serving stale graphs."""
    import torch

    resolved = choose_device(torch.cuda.is_available(), task_gpu_addresses(), device)
    fp = json.dumps(weights_fingerprint(spec), sort_keys=True)
    return load(spec, engine, resolved, threads or task_cpus(), str(cache_dir or ""), fp)
