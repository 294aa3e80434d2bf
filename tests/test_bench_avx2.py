"""bench/avx2/run, the harness that presents this CPU as an AVX2-only one: every layer that picks int8
kernels (numpy, torch, ONNX Runtime's MLAS, the engines' weight-bit choice) sees no AVX-512 or VNNI, and a
CPU without CPUID faulting gets a clear refusal instead of a silent unmasked run."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

RUN = ROOT / "bench" / "avx2" / "run"

PROBE = r"""
import json, sys, numpy as np, torch
from numpy._core._multiarray_umath import __cpu_features__ as f
from lakelens.models import engines
sys.path.insert(0, "bench")
from machine import int8_product
K = 512
sess = int8_product(np.full((K, 1), 127, np.int8), rows=1)
y = int(sess.run(None, {"A": np.full((1, K), 255, np.uint8)})[0][0, 0])
print(json.dumps({"numpy_avx512f": bool(f["AVX512F"]), "numpy_avx2": bool(f["AVX2"]),
                  "torch": torch.backends.cpu.get_cpu_capability(),
                  "flags_vnni": sorted(set(engines.cpu_flags() or ()) & set(engines.VNNI_FLAGS)),
                  "weight_bits": engines.machine_int8_weight_bits()[0], "ort_product": y, "exact": 255 * 127 * K}))
"""


def test_avx2_view_hides_vnni_from_every_kernel_chooser(tmp_path):
    log = tmp_path / "cpuids.log"
    env = {"CPUIDS_LOG": str(log), "LAKELENS_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(RUN), sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text():
        assert proc.returncode == 3 and "no cpuid_fault" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["numpy_avx2"] and not seen["numpy_avx512f"]
    assert seen["torch"] == "AVX2"
    assert seen["flags_vnni"] == [] and seen["weight_bits"] == 7
    # VPMADDUBSW sums u8 x s8 pairs into saturating int16: 255*127*2 > 32767, so ONNX Runtime's AVX2
    # kernel gives 32767 per pair where VNNI's 32-bit sums are exact; this proves which kernel ran
    assert seen["ort_product"] == 32767 * 256 != seen["exact"]
    trapped = [int(line.split()[-1]) for line in log.read_text().splitlines()]
    assert trapped and max(trapped) > 0


VNNI_PROBE = r"""
import json, sys, numpy as np, torch
from lakelens.models import engines
sys.path.insert(0, "bench")
from machine import int8_product
a = torch.randn(64, 64).to(torch.bfloat16)
torch.nn.functional.linear(a, a)  # oneDNN prints the ISA it dispatches to (ONEDNN_VERBOSE)
K = 512
sess = int8_product(np.full((K, 1), 127, np.int8), rows=1)
y = int(sess.run(None, {"A": np.full((1, K), 255, np.uint8)})[0][0, 0])
flags = set(engines.cpu_flags() or ())
print(json.dumps({"amx_flags": sorted(f for f in flags if f.startswith("amx")),
                  "vnni_flags": sorted(flags & set(engines.VNNI_FLAGS)),
                  "weight_bits": engines.machine_int8_weight_bits()[0], "ort_product": y, "exact": 255 * 127 * K}))
"""


def test_vnni_view_hides_amx_alone(tmp_path):
    """`bench/avx2/run --view vnni`: AMX is gone from /proc/cpuinfo and from what oneDNN dispatches to,
    while VNNI stays (8-bit weights, exact 32-bit int8 sums in ONNX Runtime)."""
    env = {"LAKELENS_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "ONEDNN_VERBOSE": "1"}
    proc = subprocess.run([str(RUN), "--view", "vnni", sys.executable, "-c", VNNI_PROBE], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    real = Path("/proc/cpuinfo").read_text()
    if "cpuid_fault" not in real:
        assert proc.returncode == 3 and "no cpuid_fault" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    isa = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if ",isa:" in line]
    assert seen["amx_flags"] == [] and isa and "AMX" not in isa[0]
    real_flags = set(next(line for line in real.splitlines() if line.startswith("flags")).split(":")[1].split())
    if real_flags & {"avx512_vnni", "avx_vnni"}:
        assert seen["vnni_flags"] and seen["weight_bits"] == 8 and seen["ort_product"] == seen["exact"]
    bad = subprocess.run([str(RUN), "--view", "sse", "true"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not avx2 or vnni" in bad.stderr
