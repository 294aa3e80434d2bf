"""Inference engines: an open_clip model's two towers run in torch (fp32, bf16, fp16 on a GPU) or as ONNX
graphs in ONNX Runtime (fp32, int8), cached per process and on disk."""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

from lakelens.config import CHOICES, ConfigError, EmbedConfig
from lakelens.ingest.images import Transform
from lakelens.models import local_dir
from lakelens.models import registry as models
from lakelens.models import shapes as synth
from lakelens.models.registry import ModelSpec

ENGINES: tuple = CHOICES["embed.engine"]
DEVICES: tuple = CHOICES["embed.device"]
# embed.engine's default: the fastest engine whose parity tests pass (per-image cosine >= 0.999 against
# torch fp32, and the demo's Recall@10 within one point): BENCHMARKS.md.
DEFAULT_ENGINE = EmbedConfig.engine
ONNX_OPSET = 17
EXPORT_FORMAT = 9  # bump when the exported graphs change, so old caches are not reused
# int8 image tower: ONNX Runtime's dynamic quantisation of the matrix products and fused self-attention
# (weights int8 per output channel, activations uint8 per tensor, quantised on the fly), over a graph
# traced with the patch embedding as a matrix product and attention as one fused operator
# (models.int8_source). The patch embedding's product is not quantised that way (pixels scaled per image
# cost a fine-tuned model a cosine of 0.996): it becomes an int8 product over the image's exact 8-bit
# pixels (int8_source.exact_pixel_products), and the graph takes those pixels as its input, uint8: the
# workers skip the float normalisation. The whole text tower stays fp32: one query at a time gains
# little from int8 and its cosine fell below 0.999.
# Activation scales are then fixed at export (int8_source.static_activation_scales), from each quantised
# tensor's range over CALIBRATION_IMAGES probe images other than the check's: an image's vector no longer
# depends on its batch mates, so the engine runs INT8_BATCH images per call, which reuses each weight
# matrix across the batch's rows, and each product scales and adds its bias as it writes its output
# (int8_source.fuse_integer_products; bench/int8_batch.py: 1.17-1.36x the one-image calls on AVX2, VNNI
# and AMX kernels). A graph whose static scales fail the probe check keeps its per-call (dynamic) scales and
# runs one image per call.
INT8_OPTIONS = {"per_channel": True, "op_types": ["MatMul", "Gemm", "Attention"]}
# Weight bits are chosen from the CPU's flags at export. Without VNNI, x86 multiplies uint8 x int8 pairs
# with VPMADDUBSW, whose 16-bit pair sums saturate with full-range weights (per-image cosine 0.984 against
# fp32 on ViT-B-32, instead of 0.9997), so weights keep 7 bits (reduce_range). VNNI (VPDPBUSD) and AMX
# accumulate in 32 bits: nothing saturates, and full 8-bit weights halve the rounding step.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# An int8 graph is used only if its vectors keep this cosine to the fp32 graph's on probe images
# (checked once, when it is exported); else the engine warns and tries the next candidate: an 8-bit graph
# falls back to 7 bits (the flags may promise VNNI that ONNX Runtime's kernels do not use, e.g. a VM that
# hides it from CPUID; 7 bits are safe on any kernel), a 7-bit graph to fp32.
INT8_MIN_COSINE = 0.999
CALIBRATION_IMAGES = 32
# The calibrated ranges are widened by a quarter: images unlike the probes reach past them, and values
# past a range saturate. On the shapes demo's fine-tuned model, over its 1,000 held-out images, the
# lowest cosine to fp32 was 0.99808 with the bare ranges, 0.99962 widened by 1.25 and 0.99955 by 1.5
# (a coarser step); 128 calibration images instead of 32 gave 0.99888 unwidened.
CALIBRATION_MARGIN = 1.25
INT8_BATCH = 8  # images per call of a static-scale int8 graph (4-8 fastest on 2 cores; 16 slower)
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


def _task_context():
    """The running Spark task's context, or None. pyspark is consulted only when it is already loaded
    (inside a Spark worker it always is): the query path never imports it."""
    module = sys.modules.get("pyspark")
    return module.TaskContext.get() if module is not None else None


def task_gpu_addresses() -> list[str]:
    """The GPU addresses Spark assigned to the running task (spark.task.resource.gpu.amount); [] outside one."""
    ctx = _task_context()
    gpu = ctx.resources().get("gpu") if ctx is not None else None
    return list(gpu.addresses) if gpu is not None else []


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch on a Linux machine that has no GPU device node
    (ONNX workers then never load torch)."""
    if sys.platform == "linux" and not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
                                        or os.path.exists("/dev/dxg")):
        return False
    import torch

    return torch.cuda.is_available()


def task_cpus() -> int:
    """Cores given to the running Spark task (spark.task.cpus), else every core of the machine."""
    ctx = _task_context()
    return max(1, ctx.cpus() if ctx is not None else (os.cpu_count() or 1))


def bf16_supported() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset | None:
    """The CPU's feature flags from /proc/cpuinfo's first `flags` line (Linux x86), or None where there is
    none (another OS, an ARM `Features` line, no /proc)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return None


def int8_weight_bits(flags: frozenset | set | None) -> tuple[int, str]:
    """(8 or 7, why): the int8 image tower's weight bits for a CPU with these flags (VNNI_FLAGS)."""
    if flags is None:
        return 7, "the CPU's flags are unknown (no flags line in /proc/cpuinfo), so 7 bits, safe on any kernel"
    found = [f for f in VNNI_FLAGS if f in flags]
    if found:
        return 8, f"the CPU has {', '.join(found)} (int8 dot products sum in 32 bits, nothing saturates)"
    return 7, "the CPU has no VNNI (avx512_vnni, avx_vnni, amx_int8): 8-bit weights would saturate VPMADDUBSW"


@functools.lru_cache(maxsize=4)
def machine_int8_weight_bits(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[int, str]:
    """int8_weight_bits for this machine's own flags (those `cpuinfo` lists)."""
    return int8_weight_bits(cpu_flags(cpuinfo))


def bf16_copy(model):
    """A copy of `model` with every weight and buffer cast to bf16 once. (bf16 autocast casts each weight
    again on every call: 0.62x fp32 on an AMX Xeon, where this copy runs 4.27x fp32: bench/bf16.py.)"""
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16).eval()


def time_bf16(loaded: models.LoadedModel, threads: int | None = None, batch: int = 8, repeats: int = 3,
              bf16_model=None) -> dict:
    """The image tower on a probe batch in fp32 and in bf16 (`bf16_model`, else a bf16 copy), best of
    `repeats` each after a warm-up, alternating: {"fp32_ms", "bf16_ms"}. Native bf16 kernels are no promise
    of speed (AVX512-BF16 without AMX multiplies bf16 slower than fp32), so the engine asks the CPU it runs
    on."""
    import time

    import torch

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 3, loaded.image_size, loaded.image_size))
                         .astype(np.float32))
    bf16_model = bf16_copy(loaded.model) if bf16_model is None else bf16_model
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    best = {"fp32_ms": float("inf"), "bf16_ms": float("inf")}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for key, model, inp in (("fp32_ms", loaded.model, x), ("bf16_ms", bf16_model, x.to(torch.bfloat16))):
                t0 = time.perf_counter()
                model.encode_image(inp)
                if i:  # the first round warms both up
                    best[key] = min(best[key], (time.perf_counter() - t0) * 1000)
    return {k: round(v, 3) for k, v in best.items()}


# --- torch ---------------------------------------------------------------------------------------
class TorchEngine:
    """The open_clip model itself: on a CPU with `dtype` bf16, a copy with its weights cast to bf16 once
    (`bf16_model`, if made already), fed bf16 images; on a GPU, autocast to `dtype` (fp16)."""

    def __init__(self, loaded: models.LoadedModel, device: str = "cpu", dtype=None, name: str = "torch",
                 threads: int | None = None, bf16_model=None):
        import torch

        self.name, self.device, self.dtype, self.threads = name, device, dtype, threads
        self.cast = device == "cpu" and dtype is not None  # weights in bf16 already: no autocast
        if self.cast:
            self.model = bf16_model if bf16_model is not None else bf16_copy(loaded.model)
        else:
            self.model = loaded.model if device == "cpu" else loaded.model.to(device)
        self.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        self.image_size, self.dim = loaded.image_size, loaded.dim
        self.transform = loaded.transform
        self.takes_pixels = False  # fed float model input (only the int8 ONNX tower takes 8-bit pixels)
        self.timing: dict | None = None  # torch-bf16: the probe that chose the precision (time_bf16)

    def _run(self, fn, x) -> np.ndarray:
        import torch

        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # the task's cores; Spark runs other tasks beside it
        x = torch.as_tensor(x).to(self.device)
        with torch.inference_mode():
            with torch.autocast(self.device.split(":")[0], dtype=self.dtype,
                                enabled=self.dtype is not None and not self.cast):
                out = fn(x)
            # unit length in fp32: normalised in bf16 (8 mantissa bits) or fp16, a vector's length is off
            # by up to a few parts in a thousand, which reads as a cosine of 0.997 to fp32 for vectors whose
            # directions agree to 0.9999
            return torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()

    def encode_image(self, images) -> np.ndarray:
        import torch

        if self.cast:  # float images to the bf16 weights' type (token ids stay integers)
            images = torch.as_tensor(images).to(self.dtype)
        return self._run(self.model.encode_image, images)

    def encode_text(self, tokens) -> np.ndarray:
        return self._run(self.model.encode_text, tokens)


# --- ONNX export and on-disk cache ---------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("LAKELENS_CACHE_DIR") or Path.home() / ".cache" / "lakelens"
    return Path(root) / "onnx"


def weights_fingerprint(spec: ModelSpec) -> dict:
    """What identifies the weights: the spec, plus size and mtime of a local checkpoint file (and of a
    model folder's config and tokenizer)."""
    out = {"spec": spec.key}
    stamp = models.weights_stamp(spec)  # the same stamp that keys models.load's cache
    if stamp:
        out.update(size=stamp[0], mtime_ns=stamp[1])
    if local_dir.is_local_dir(spec.name):
        out["folder"] = list(local_dir.folder_stamp(local_dir.folder_of(spec.name)))
    return out


def cache_key(spec: ModelSpec) -> str:
    # release numbers from the installed metadata: a cached graph is found without importing torch
    facts = {**weights_fingerprint(spec), "torch": metadata.version("torch"),
             "open_clip": metadata.version("open_clip_torch"), "opset": ONNX_OPSET, "format": EXPORT_FORMAT}
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


def probe_images(loaded: models.LoadedModel, n: int = 16, seed: int = 7) -> np.ndarray:
    """Preprocessed probe images for the int8 check (seed 7) and calibration (another seed): rendered
    shapes on plain, striped and dotted backgrounds, and smooth colour fields with grain (photo-like
    statistics)."""
    from PIL import Image

    first = 0 if seed == 7 else 1000 * seed  # render seeds of their own for every other probe set
    pictures = [synth.render(sample, 160, seed=first + i) for i, sample in enumerate(synth.samples(n // 2, seed=seed))]
    rng = np.random.default_rng(seed)
    for _ in range(n - len(pictures)):
        field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((300, 240), Image.BICUBIC)
        grain = rng.normal(0, 8, (240, 300, 3))
        pictures.append(Image.fromarray(np.clip(np.asarray(field) + grain, 0, 255).astype(np.uint8)))
    return np.stack([np.asarray(loaded.preprocess(p), dtype=np.float32) for p in pictures])


def _int8_source(loaded: models.LoadedModel, fp32: Path, source: Path) -> dict:
    """The graph that int8 quantises, written to `source`: the image tower traced with its patch embedding
    as a matrix product and its self-attention as ONNX Runtime's fused Attention operator
    (models.int8_source), batch dynamic. A model near protobuf's 2 GB limit (one file cannot hold it)
    quantises the fp32 graph as it is."""
    if sum(f.stat().st_size for f in fp32.iterdir() if f.name not in ("text.onnx", "meta.json")) > 1.5e9:
        try:
            os.link(fp32 / "image.onnx", source)
        except OSError:
            shutil.copyfile(fp32 / "image.onnx", source)
        return {"patch_linear": 0, "fused_attention": 0, "batch": "dynamic"}
    from lakelens.models import int8_source

    image, _ = _towers(loaded.model)
    counts = int8_source.export(image, loaded.model.visual, loaded.image_size, str(source), ONNX_OPSET)
    return {**counts, "batch": "dynamic"}


def _export_int8(loaded: models.LoadedModel, fp32: Path, folder: Path, weight_bits: int) -> dict:
    """Quantise the image tower with `weight_bits` (8, or 7 = reduce_range); return the probe check's
    result for meta.json."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    opts = INT8_OPTIONS
    # the quantiser writes a shape-inferred copy beside its input: give it a private input, so workers
    # quantising at once do not delete each other's copies (and fp32/ stays as published)
    source = folder / "fp32-image.onnx"
    rewrites = _int8_source(loaded, fp32, source)
    from lakelens.models import int8_source

    # the patch embedding's product is left to exact_pixel_products (int8 over the 8-bit pixels)
    keep_fp32 = int8_source.pixel_matmuls(str(source))
    quantize_dynamic(str(source), str(folder / "image.onnx"), weight_type=QuantType.QInt8,
                     per_channel=opts["per_channel"], reduce_range=weight_bits == 7,
                     op_types_to_quantize=opts["op_types"], nodes_to_exclude=keep_fp32)
    transform = loaded.transform
    pixel_int8 = [] if transform is None else int8_source.exact_pixel_products(
        str(folder / "image.onnx"), keep_fp32, transform.mean, transform.std, weight_bits)
    keep_fp32 = [n for n in keep_fp32 if n not in pixel_int8]
    source.unlink()
    x = probe_images(loaded)
    ref = _session(fp32 / "image.onnx", 0).run(None, {"image": x})[0]

    def in_calls(session, images, per_call):  # the images through `session`, per_call at a time
        return np.concatenate([session.run(None, feed(session, images[i:i + per_call], transform))[0]
                               for i in range(0, len(images), per_call)])

    dynamic = _session(folder / "image.onnx", 1)
    # static activation scales, calibrated one image per call on probe images the check does not use
    calibration = probe_images(loaded, CALIBRATION_IMAGES, seed=11)
    ranges = int8_source.activation_ranges(str(folder / "image.onnx"), [
        feed(dynamic, calibration[i:i + 1], transform) for i in range(len(calibration))])
    ranges = {k: (lo * CALIBRATION_MARGIN, hi * CALIBRATION_MARGIN) for k, (lo, hi) in ranges.items()}
    static_path = folder / "image-static.onnx"
    fixed = int8_source.static_activation_scales(str(folder / "image.onnx"), str(static_path), ranges)
    static = _session(static_path, 1)
    # as the engine runs it: batches of INT8_BATCH; and each image alone, which must give the same vector
    batched, alone = in_calls(static, x, INT8_BATCH), in_calls(static, x, 1)
    static_cosine = float((ref * batched).sum(1).min())
    check = {"calibration_images": len(calibration), "static_quantize_nodes": fixed,
             "static_probe_min_cosine": round(static_cosine, 6),
             "static_batch_max_abs_diff": float(np.abs(batched - alone).max())}
    if fixed and static_cosine >= INT8_MIN_COSINE and check["static_batch_max_abs_diff"] == 0.0:
        os.replace(static_path, folder / "image.onnx")
        scales, batch, cosine, graph = "static", INT8_BATCH, static_cosine, static
    else:
        static_path.unlink()
        # one image per call, as the engine then runs it: activation scales are per call
        got = in_calls(dynamic, x, 1)
        scales, batch, cosine, graph = "dynamic", 1, float((ref * got).sum(1).min()), dynamic
    return {"probe_images": len(x), "probe_min_cosine": round(cosine, 6), "accepted": cosine >= INT8_MIN_COSINE,
            "activation_scales": scales, "images_per_call": batch, **check,
            "rewrites": rewrites, "pixel_int8_nodes": pixel_int8, "fp32_nodes": keep_fp32,
            "input": graph.get_inputs()[0].name}


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
            meta = {**meta, **(build(tmp) or {})}
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


def int8_variant(weight_bits: int) -> str:
    # The bits name the folder: a cache shared by machines with and without VNNI holds both graphs, and
    # each machine reads only the one made (and probe-checked) for its kind.
    return f"int8-w{weight_bits}"


def onnx_graphs(spec: ModelSpec, quantized: bool = False, cache_dir: str | Path | None = None,
                weight_bits: int | None = None) -> Path:
    """The folder of this model's graphs: fp32/ (image.onnx, text.onnx) or int8-w8/ or int8-w7/ (image.onnx),
    each with its meta.json. int8 weight bits default to this machine's choice (machine_int8_weight_bits).
    Found on disk without loading the model; exported (and quantised) once otherwise."""
    root = Path(cache_dir or default_cache_dir()) / cache_key(spec)
    if quantized:
        # meta.json says why these bits, whichever caller asked: this CPU's own choice, or a request
        own_bits, own_why = machine_int8_weight_bits()
        weight_bits = own_bits if weight_bits is None else weight_bits
        if weight_bits not in (7, 8):
            raise ValueError(f"int8 weight bits: {weight_bits!r} is not 7 or 8")
        why = own_why if weight_bits == own_bits else f"asked for (this CPU's choice is {own_bits} bits: {own_why})"
    variant = int8_variant(weight_bits) if quantized else "fp32"
    if (root / variant / "meta.json").is_file():  # int8 folders are only ever made after fp32/
        return root / variant
    loaded = models.load(spec)
    transform = loaded.transform
    meta = {**weights_fingerprint(spec), "image_size": loaded.image_size, "dim": loaded.dim, "opset": ONNX_OPSET,
            "transform": transform.to_dict() if transform else None}
    fp32 = _publish(root, "fp32", lambda tmp: _export_fp32(loaded, tmp), {**meta, "precision": "fp32"})
    if not quantized:
        return fp32
    flags = cpu_flags()
    return _publish(root, variant, lambda tmp: _export_int8(loaded, fp32, tmp, weight_bits),
                    {**meta, "precision": "int8", **INT8_OPTIONS, "weight_bits": weight_bits,
                     "reduce_range": weight_bits == 7, "weight_bits_why": why,
                     # the probe check ran on this machine's kernels: say which
                     "checked_on_vnni": None if flags is None else [f for f in VNNI_FLAGS if f in flags]})


def takes_pixels(session) -> bool:
    """True for a graph whose input is the image's 8-bit pixels (the int8 tower), False for a float one."""
    return session.get_inputs()[0].type == "tensor(uint8)"


def feed(session, x: np.ndarray, transform: Transform | None) -> dict:
    """The input feed of an image graph for a batch `x` of preprocessed images, float32 model input or
    uint8 pixels (Transform.pixels), converted to what the graph takes with `transform`."""
    x, graph_input = np.asarray(x), session.get_inputs()[0]
    if graph_input.type == "tensor(uint8)":  # takes_pixels
        x = x if x.dtype == np.uint8 else transform.to_pixels(x)
    elif x.dtype == np.uint8:
        x = transform.normalize(x)
    else:
        x = x.astype(np.float32, copy=False)
    return {graph_input.name: np.ascontiguousarray(x)}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # the task's cores; Spark runs other tasks beside it
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads would spin on cores the decode threads need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxEngine:
    """ONNX Runtime sessions over the exported towers; the text session is opened on first use. Built
    from the on-disk cache alone when the graphs are there: no torch, no open_clip, no torch model."""

    def __init__(self, spec: ModelSpec, quantized: bool = False, threads: int = 1,
                 cache_dir: str | Path | None = None):
        self.name, self.device, self.threads = ("onnx-int8" if quantized else "onnx"), "cpu", threads
        self.text_folder = self.folder = onnx_graphs(spec, False, cache_dir)
        meta = json.loads((self.folder / "meta.json").read_text())
        self.precision, self.weight_bits, self.per_call = meta["precision"], None, None
        if quantized:
            bits, why = machine_int8_weight_bits()
            for b in (8, 7) if bits == 8 else (7,):
                int8 = onnx_graphs(spec, True, cache_dir, weight_bits=b)
                check = json.loads((int8 / "meta.json").read_text())
                if check["accepted"]:
                    self.folder, self.precision, self.weight_bits = int8, check["precision"], b
                    self.per_call = int(check["images_per_call"])
                    log.info("embed.engine onnx-int8: %d-bit weights for %s, since %s; %s activation scales, %d "
                             "image(s) per call (probe cosine to fp32 %.5f)",
                             b, spec.key, why if b == bits else "the 8-bit graph failed its probe check",
                             check["activation_scales"], self.per_call, check["probe_min_cosine"])
                    break
                log.warning("embed.engine onnx-int8: the %d-bit int8 graph of %s kept a cosine of only %.4f to fp32 "
                            "on probe images (needs %s); %s", b, spec.key, check["probe_min_cosine"], INT8_MIN_COSINE,
                            "trying 7-bit weights" if b == 8 else "running the fp32 graph instead")
        self.image_size, self.dim = int(meta["image_size"]), int(meta["dim"])
        self.transform = Transform(**meta["transform"]) if meta.get("transform") else None
        # int8 runs `per_call` images per call (INT8_BATCH with static activation scales; 1 with scales
        # computed per call, so that an image's vector does not depend on its batch mates), with `threads`
        # calls at a time on one thread each: faster than one call on several threads.
        self._sliced = self.per_call is not None
        self._image = _session(self.folder / "image.onnx", 1 if self._sliced else threads)
        # the int8 graph takes 8-bit pixels: the Embedder then feeds it Transform.pixels
        self.takes_pixels = takes_pixels(self._image)
        self._input = self._image.get_inputs()[0].name
        self._pool = ThreadPoolExecutor(threads) if self._sliced and threads > 1 else None
        self._text = None

    def encode_image(self, images) -> np.ndarray:
        """A batch of preprocessed images, float32 model input or uint8 pixels (either for any graph)."""
        x = feed(self._image, images, self.transform)[self._input]
        if not self._sliced:
            return self._image.run(None, {self._input: x})[0]
        # calls of at most per_call images, as many as a multiple of the threads, of even sizes
        workers = self.threads if self._pool else 1
        calls = min(len(x), -(-len(x) // (self.per_call * workers)) * workers)
        one = lambda part: self._image.run(None, {self._input: part})[0]  # noqa: E731
        parts = np.array_split(x, calls) if calls else []
        rows = list(self._pool.map(one, parts)) if self._pool else [one(p) for p in parts]
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)

    def encode_text(self, tokens) -> np.ndarray:
        if self._text is None:
            self._text = _session(self.text_folder / "text.onnx", self.threads)
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
