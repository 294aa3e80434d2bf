"""Where an engine runs: the CPU or which GPU (a GPU that Spark assigned to the task wins), and how many
cores the running Spark task was given. pyspark and torch are consulted only when needed, so the query
path imports neither."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence

from lakelens.config import CHOICES, ConfigError

DEVICES: tuple = CHOICES["embed.device"]


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
