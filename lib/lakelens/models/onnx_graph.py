"""What every ONNX graph of a model's towers shares: the opset, each tower as a module that traces (its
output normalised), and how a graph is opened (an ONNX Runtime session with the engines' threading) and fed
(8-bit pixels or float model input, whichever its input is)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lakelens.ingest.images import Transform

ONNX_OPSET = 17


def towers(model):
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


def open_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # the task's cores; Spark runs other tasks beside it
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads would spin on cores the decode threads need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
