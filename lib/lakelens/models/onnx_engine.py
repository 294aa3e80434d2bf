"""The ONNX engines (onnx, onnx-int8): ONNX Runtime sessions over a model's exported towers, built from the
on-disk cache alone when the graphs are there (no torch, no open_clip). onnx-int8 runs the int8 graph made
for this CPU's weight bits that passed its probe check, else the 7-bit one, else fp32."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lakelens.ingest.images import Transform
from lakelens.models import cpu, int8_calibration
from lakelens.models.onnx_export import onnx_graphs
from lakelens.models.onnx_graph import feed, open_session, takes_pixels
from lakelens.models.registry import ModelSpec

log = logging.getLogger("lakelens.models.engines")  # the engines' one logger, as before they were split


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
            bits, why = cpu.machine_int8_weight_bits()
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
                            "on probe images (needs %s); %s", b, spec.key, check["probe_min_cosine"],
                            int8_calibration.INT8_MIN_COSINE,
                            "trying 7-bit weights" if b == 8 else "running the fp32 graph instead")
        self.image_size, self.dim = int(meta["image_size"]), int(meta["dim"])
        self.transform = Transform(**meta["transform"]) if meta.get("transform") else None
        # int8 runs `per_call` images per call (INT8_BATCH with static activation scales; 1 with scales
        # computed per call, so that an image's vector does not depend on its batch mates), with `threads`
        # calls at a time on one thread each: faster than one call on several threads.
        self._sliced = self.per_call is not None
        self._image = open_session(self.folder / "image.onnx", 1 if self._sliced else threads)
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
            self._text = open_session(self.text_folder / "text.onnx", self.threads)
        return self._text.run(None, {"tokens": np.asarray(tokens, dtype=np.int64)})[0]
