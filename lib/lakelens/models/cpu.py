"""What the CPU's flags decide for the engines: the int8 image tower's weight bits (VNNI or not), and
whether torch has native bf16 kernels."""

from __future__ import annotations

import functools
from pathlib import Path

# Weight bits are chosen from the CPU's flags at export. Without VNNI, x86 multiplies uint8 x int8 pairs
# with VPMADDUBSW, whose 16-bit pair sums saturate with full-range weights (per-image cosine 0.984 against
# fp32 on ViT-B-32, instead of 0.9997), so weights keep 7 bits (reduce_range). VNNI (VPDPBUSD) and AMX
# accumulate in 32 bits: nothing saturates, and full 8-bit weights halve the rounding step.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


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
