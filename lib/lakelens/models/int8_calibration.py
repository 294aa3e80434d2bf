"""The int8 image tower (engine onnx-int8): the fp32 tower traced again with int8-friendly rewrites
(models.int8_source), quantised with the CPU's weight bits, its activation scales calibrated on probe
images and fixed, then checked against the fp32 graph on other probe images. onnx_export.onnx_graphs calls
it when it makes an int8 folder; the result goes into the folder's meta.json."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from lakelens.models import registry as models
from lakelens.models import shapes as synth
from lakelens.models.onnx_graph import ONNX_OPSET, feed, open_session, towers

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
# (int8_source.fuse_integer_products; 1.17-1.36x the one-image calls on AVX2, VNNI and AMX kernels:
# docs/decisions/int8-engine.md). A graph whose static scales fail the probe check keeps its per-call
# (dynamic) scales and runs one image per call.
INT8_OPTIONS = {"per_channel": True, "op_types": ["MatMul", "Gemm", "Attention"]}
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

    image, _ = towers(loaded.model)
    counts = int8_source.export(image, loaded.model.visual, loaded.image_size, str(source), ONNX_OPSET)
    return {**counts, "batch": "dynamic"}


def export_int8(loaded: models.LoadedModel, fp32: Path, folder: Path, weight_bits: int) -> dict:
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
    ref = open_session(fp32 / "image.onnx", 0).run(None, {"image": x})[0]

    def in_calls(session, images, per_call):  # the images through `session`, per_call at a time
        return np.concatenate([session.run(None, feed(session, images[i:i + per_call], transform))[0]
                               for i in range(0, len(images), per_call)])

    dynamic = open_session(folder / "image.onnx", 1)
    # static activation scales, calibrated one image per call on probe images the check does not use
    calibration = probe_images(loaded, CALIBRATION_IMAGES, seed=11)
    ranges = int8_source.activation_ranges(str(folder / "image.onnx"), [
        feed(dynamic, calibration[i:i + 1], transform) for i in range(len(calibration))])
    ranges = {k: (lo * CALIBRATION_MARGIN, hi * CALIBRATION_MARGIN) for k, (lo, hi) in ranges.items()}
    static_path = folder / "image-static.onnx"
    fixed = int8_source.static_activation_scales(str(folder / "image.onnx"), str(static_path), ranges)
    static = open_session(static_path, 1)
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
