"""A model's towers as ONNX graphs: exported once (fp32; the int8 image tower through
models.int8_calibration) into an on-disk cache keyed by the weights and the releases that made them, and
published by rename, so concurrent workers never see half a graph."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections import Counter
from importlib import metadata
from pathlib import Path

from lakelens.models import cpu, int8_calibration, local_dir
from lakelens.models import registry as models
from lakelens.models.onnx_graph import ONNX_OPSET, towers
from lakelens.models.registry import ModelSpec

EXPORT_FORMAT = 9  # bump when the exported graphs change, so old caches are not reused
EXPORTS: Counter = Counter()  # (cache folder, variant) -> exports done by this process; tests read it

_EXPORT_LOCK = threading.Lock()


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


def _export_fp32(loaded: models.LoadedModel, folder: Path) -> None:
    import torch

    image, text = towers(loaded.model)
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
        own_bits, own_why = cpu.machine_int8_weight_bits()
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
    flags = cpu.cpu_flags()
    return _publish(root, variant, lambda tmp: int8_calibration.export_int8(loaded, fp32, tmp, weight_bits),
                    {**meta, "precision": "int8", **int8_calibration.INT8_OPTIONS, "weight_bits": weight_bits,
                     "reduce_range": weight_bits == 7, "weight_bits_why": why,
                     # the probe check ran on this machine's kernels: say which
                     "checked_on_vnni": None if flags is None else [f for f in cpu.VNNI_FLAGS if f in flags]})
