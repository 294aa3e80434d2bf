"""The torch engine: the open_clip model itself, in fp32, in bf16 on a CPU (a copy with its weights cast
once, used where a probe batch runs faster in it), or with fp16 autocast on a GPU."""

from __future__ import annotations

import numpy as np

from lakelens.models import registry as models


def bf16_copy(model):
    """A copy of `model` with every weight and buffer cast to bf16 once. (bf16 autocast casts each weight
    again on every call: 0.62x fp32 on an AMX Xeon, where this copy runs 4.27x fp32: docs/decisions/bf16-engine.md.)"""
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
