"""Inference engines against the torch model, the ONNX cache, device choice and engine config checks
(lakelens.models.engines and the modules it is made of: devices, cpu, torch_engine, onnx_graph,
onnx_export, int8_calibration, onnx_engine)."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import encode, noise_image

from lakelens import Embedder, ModelSpec, config
from lakelens.config import ConfigError
from lakelens.models import cpu, engines, int8_calibration
from lakelens.models import registry as models

TINY = ModelSpec("lakelens-tiny")
TEXTS = ["a red circle", "a blue square on a wooden table", "x", "a photo of a dog running on the beach"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx-cache"))


@pytest.fixture(scope="module")
def contents():
    return [encode(noise_image(i, (70 + i, 50)), "JPEG") for i in range(10)]


def embed_all(engine, contents, cache):
    emb = Embedder(TINY, batch_size=4, engine=engine, onnx_cache=cache, threads=1)
    return np.stack([r.embedding for r in emb(contents)]), emb.embed_texts(TEXTS), emb


def min_cos(a, b):
    return float((a * b).sum(1).min())


@pytest.fixture(scope="module")
def reference(contents, cache):
    images, texts, _ = embed_all("torch", contents, cache)
    return images, texts


@pytest.mark.parametrize("engine, bar", [("onnx", 0.99999), ("onnx-int8", 0.999)])
def test_onnx_engines_match_torch(engine, bar, contents, cache, reference):
    images, texts, emb = embed_all(engine, contents, cache)
    assert emb.engine.name == engine and emb.engine.precision == ("int8" if "int8" in engine else "fp32")
    assert images.shape == reference[0].shape and texts.shape == reference[1].shape == (4, 128)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert min_cos(images, reference[0]) >= bar
    assert min_cos(texts, reference[1]) >= 0.99999  # the text tower runs fp32 in both ONNX engines
    if engine == "onnx":
        assert np.abs(images - reference[0]).max() < 1e-5  # the issue #2 parity bar holds for onnx too
    else:  # really int8: close to fp32, not equal to it
        assert emb.engine.folder.name == f"int8-w{emb.engine.weight_bits}"
        assert np.abs(images - reference[0]).max() > 1e-5
    # the vectors still tell the images apart as torch's do: the same nearest neighbour for every image,
    # except where torch's own two nearest are a near-tie (the tiny random model's noise images lie close
    # together: their top-two gaps are 0.0002-0.002, of the order of int8's rounding)
    sims, ref_sims = images @ images.T - 2 * np.eye(10), reference[0] @ reference[0].T - 2 * np.eye(10)
    flipped = sims.argmax(1) != ref_sims.argmax(1)
    top2 = np.sort(ref_sims, 1)[:, -2:]
    assert flipped.sum() <= 2 and (top2[flipped, 1] - top2[flipped, 0] < 5e-4).all()


def test_int8_vectors_do_not_depend_on_the_batch_or_threads(contents, cache):
    """Activation scales are fixed at export (or, where those fail the check, the engine runs one image per
    call): an image gets the same vector whatever its batch mates, batch size and thread count."""
    one = Embedder(TINY, batch_size=1, engine="onnx-int8", onnx_cache=cache, threads=1)
    many = Embedder(TINY, batch_size=7, engine="onnx-int8", onnx_cache=cache, threads=2)
    a = np.stack([r.embedding for r in one(contents)])
    b = np.stack([r.embedding for r in many(contents[::-1])])[::-1]
    assert np.array_equal(a, b)


def test_int8_graph_that_fails_its_probe_check_is_not_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(int8_calibration, "INT8_MIN_COSINE", 1.01)  # no int8 graph can reach it
    engine = engines.OnnxEngine(TINY, quantized=True, cache_dir=tmp_path)
    bits = engines.machine_int8_weight_bits()[0]
    meta = json.loads((tmp_path / engines.cache_key(TINY) / f"int8-w{bits}" / "meta.json").read_text())
    assert meta["accepted"] is False and 0.999 < meta["probe_min_cosine"] < 1.0 and meta["probe_images"] == 16
    assert engine.folder.name == "fp32" and engine.precision == "fp32" and engine.weight_bits is None
    assert "running the fp32 graph instead" in caplog.text
    monkeypatch.setattr(int8_calibration, "INT8_MIN_COSINE", 0.999)
    assert engines.OnnxEngine(TINY, quantized=True, cache_dir=tmp_path).precision == "fp32"  # decided once


@pytest.mark.parametrize("flags, bits", [
    ({"sse4_2", "avx2", "fma"}, 7),
    ({"avx2", "fma", "avx512f", "avx512bw"}, 7),  # AVX-512 without VNNI still multiplies with VPMADDUBSW
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, 8),
    ({"avx2", "avx_vnni"}, 8),
    ({"avx512f", "amx_tile", "amx_int8"}, 8),
    (set(), 7),
    (None, 7),  # unknown: the bits that are safe on any kernel
])
def test_int8_weight_bits_follow_the_cpu_flags(flags, bits):
    got, why = engines.int8_weight_bits(frozenset(flags) if flags is not None else None)
    assert got == bits and why
    if bits == 8:
        assert any(f in why for f in engines.VNNI_FLAGS)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_vnni\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512_vnni\n")
    assert engines.cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # ARM names its line otherwise
    assert engines.cpu_flags(info) is None
    assert engines.cpu_flags(tmp_path / "missing") is None


def cpuinfo_text(flags: str, model: str = "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") -> str:
    """/proc/cpuinfo as Linux writes it on x86: a block per logical CPU, each with its flags line."""
    block = (f"processor\t: {{n}}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
             f"flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 {flags}\n"
             "bugs\t\t: spectre_v1 spectre_v2\n\n")
    return "".join(block.format(n=n) for n in range(2))


@pytest.mark.parametrize("text, bits, named", [
    pytest.param(cpuinfo_text("avx avx2 fma bmi2"), 7, None, id="avx2-laptop"),
    pytest.param(cpuinfo_text("avx avx2 fma avx512f avx512dq avx512bw avx512vl"), 7, None, id="skylake-sp"),
    pytest.param(cpuinfo_text("avx avx2 fma avx512f avx512bw avx512_vnni"), 8, "avx512_vnni", id="cascade-lake"),
    pytest.param(cpuinfo_text("avx avx2 fma avx_vnni", "12th Gen Intel(R) Core(TM) i7-12700"), 8, "avx_vnni",
                 id="alder-lake"),
    # the words in the model name are no flags: only the flags line counts
    pytest.param(cpuinfo_text("avx avx2 fma", "avx512_vnni avx_vnni test box"), 7, None, id="vnni-in-the-name"),
    pytest.param("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n", 7, None, id="arm"),
])
def test_machine_weight_bits_are_8_only_on_a_cpuinfo_that_lists_vnni(tmp_path, text, bits, named):
    info = tmp_path / "cpuinfo"  # a file of its own per case: the answer is cached per file
    info.write_text(text)
    got, why = engines.machine_int8_weight_bits(info)
    assert got == bits
    if named:
        assert named in why
    else:
        assert "no VNNI" in why or "unknown" in why


def test_this_machine_runs_8_bit_weights_if_its_cpuinfo_lists_vnni():
    try:
        listed = open("/proc/cpuinfo").read().split()
    except OSError:
        listed = []
    vnni = any(flag in listed for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
    assert engines.machine_int8_weight_bits()[0] == (8 if vnni else 7)


def int8_weights(path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    found = [numpy_helper.to_array(i).ravel() for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert found, "no int8 initialisers: the graph is not quantised"
    return np.concatenate(found).astype(np.int16)


@pytest.mark.parametrize("bits", [7, 8])
def test_int8_graph_holds_the_weight_bits_it_records(bits, cache):
    folder = engines.onnx_graphs(TINY, True, cache, weight_bits=bits)
    meta = json.loads((folder / "meta.json").read_text())
    assert folder.name == f"int8-w{bits}" and meta["weight_bits"] == bits and meta["reduce_range"] == (bits == 7)
    w = np.abs(int8_weights(folder / "image.onnx"))
    if bits == 7:  # onnxruntime's reduced int8 range is [-64, 64]
        assert w.max() <= 64
    else:  # symmetric per channel: each output channel's largest weight lands on 127
        assert w.max() == 127 and (w > 64).mean() > 0.01


def test_engine_runs_the_weight_bits_chosen_for_this_cpu(cache, caplog):
    import logging

    bits, why = engines.int8_weight_bits(engines.cpu_flags())  # 8 on a VNNI machine, 7 on an AVX2-only one
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        engine = engines.OnnxEngine(TINY, quantized=True, cache_dir=cache)
    assert engine.precision == "int8" and engine.weight_bits == bits and engine.folder.name == f"int8-w{bits}"
    assert f"{bits}-bit weights" in caplog.text and why in caplog.text
    meta = json.loads((engine.folder / "meta.json").read_text())
    assert meta["weight_bits"] == bits and meta["weight_bits_why"] == why and meta["accepted"] is True
    w = np.abs(int8_weights(engine.folder / "image.onnx"))
    assert (w.max() > 64) == (bits == 8)
    # cosine to fp32 on the probe images, one image per call as the engine runs it, here and now
    x = engines.probe_images(models.load(TINY))
    ref = engines.OnnxEngine(TINY, quantized=False, cache_dir=cache).encode_image(x)
    got = engine.encode_image(x)
    assert min_cos(got, ref) >= 0.999 and not np.array_equal(got, ref)


def test_8bit_graph_that_fails_its_check_falls_back_to_7bit(tmp_path, monkeypatch, caplog):
    """A VNNI CPU whose 8-bit graph failed its probe check (its kernels saturate after all) runs 7 bits."""
    monkeypatch.setattr(cpu, "machine_int8_weight_bits", lambda: (8, "the CPU has avx512_vnni"))
    w8 = engines.onnx_graphs(TINY, True, tmp_path)
    meta_path = w8 / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "accepted": False, "probe_min_cosine": 0.984}))
    engine = engines.OnnxEngine(TINY, quantized=True, cache_dir=tmp_path)
    assert engine.precision == "int8" and engine.weight_bits == 7 and engine.folder.name == "int8-w7"
    assert "trying 7-bit weights" in caplog.text and "running the fp32 graph" not in caplog.text


def test_shared_cache_serves_each_cpu_kind_its_own_graph(tmp_path, monkeypatch):
    """A cache folder shared by a VNNI machine and an AVX2-only one: neither runs the other's int8 graph."""
    root = str(tmp_path / engines.cache_key(TINY))
    monkeypatch.setattr(cpu, "machine_int8_weight_bits", lambda: (8, "vnni"))
    assert engines.OnnxEngine(TINY, quantized=True, cache_dir=tmp_path).weight_bits == 8
    monkeypatch.setattr(cpu, "machine_int8_weight_bits", lambda: (7, "no vnni"))
    engine = engines.OnnxEngine(TINY, quantized=True, cache_dir=tmp_path)
    assert engine.weight_bits == 7 and engine.folder.name == "int8-w7"
    assert engines.EXPORTS[(root, "int8-w7")] == 1 and engines.EXPORTS[(root, "fp32")] == 1  # fp32 is shared
    assert sorted(p.name for p in (tmp_path / engines.cache_key(TINY)).iterdir()) == ["fp32", "int8-w7", "int8-w8"]
    with pytest.raises(ValueError, match="7 or 8"):
        engines.onnx_graphs(TINY, True, tmp_path, weight_bits=4)


class Counting:
    """An ONNX Runtime session that records how many images each call carried."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, outputs, feed):
        self.calls.append(len(next(iter(feed.values()))))
        return self.session.run(outputs, feed)

    def get_inputs(self):
        return self.session.get_inputs()


def test_int8_graph_has_static_scales_and_runs_batches(cache, caplog):
    """The int8 graph's activation scales are fixed at export from calibration images, so it takes a dynamic
    batch and the engine runs INT8_BATCH images per call; an image's vector is the same alone or in any
    batch (test_int8_vectors_do_not_depend_on_the_batch_or_threads checks it through the Embedder)."""
    import onnx

    folder = engines.onnx_graphs(TINY, True, cache)
    meta = json.loads((folder / "meta.json").read_text())
    int8 = onnx.load(str(folder / "image.onnx"), load_external_data=False)
    ops = [n.op_type for n in int8.graph.node]
    assert meta["activation_scales"] == "static" and meta["images_per_call"] == engines.INT8_BATCH
    assert "DynamicQuantizeLinear" not in ops and ops.count("QuantizeLinear") == meta["static_quantize_nodes"] > 0
    assert meta["calibration_images"] == engines.CALIBRATION_IMAGES and meta["static_batch_max_abs_diff"] == 0.0
    assert meta["probe_min_cosine"] == meta["static_probe_min_cosine"] >= 0.999
    for value in (*int8.graph.input, *int8.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    with caplog.at_level("INFO", logger="lakelens.models.engines"):
        engine = engines.OnnxEngine(TINY, quantized=True, cache_dir=cache, threads=2)
    assert engine.per_call == engines.INT8_BATCH and "static activation scales" in caplog.text
    engine._image = Counting(engine._image)
    x = np.random.default_rng(3).normal(size=(21, 3, 64, 64)).astype(np.float32)
    together = engine.encode_image(x)
    assert together.shape == (21, 128) and sorted(engine._image.calls) == [5, 5, 5, 6]  # <= 8 a call, 2 threads
    assert np.array_equal(together[2:3], engine.encode_image(x[2:3]))


@pytest.fixture(scope="module")
def narrow_ranges_cache(tmp_path_factory):
    """A cache whose int8 graph was exported with calibrated ranges far too narrow (values saturate): its
    static scales fail the probe check, so it keeps the per-call-scale graph."""
    folder = tmp_path_factory.mktemp("narrow-ranges")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8_calibration, "CALIBRATION_MARGIN", 0.02)
        engines.onnx_graphs(TINY, True, folder)
    return folder


def test_fused_integer_products_give_the_unfused_numbers(tmp_path, narrow_ranges_cache):
    """fuse_integer_products turns each MatMulInteger -> Cast -> Mul [-> Add] chain into one
    MatMulIntegerToFloat: the same vectors, to float rounding, from fewer passes over the activations."""
    import onnx
    import onnxruntime as ort

    from lakelens.models import int8_source

    dynamic = engines.onnx_graphs(TINY, True, narrow_ranges_cache) / "image.onnx"  # the per-call-scale graph
    loaded = models.load(TINY)
    pixels = loaded.transform.to_pixels(engines.probe_images(loaded, 8, seed=11))
    ranges = int8_source.activation_ranges(str(dynamic), [{"pixels": pixels[i:i + 1]} for i in range(8)])
    out = {}
    for fuse in (False, True):
        path = str(tmp_path / f"static-{fuse}.onnx")
        assert int8_source.static_activation_scales(str(dynamic), path, ranges, fuse=fuse) == len(ranges) > 0
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert ("MatMulInteger" in ops) != fuse and ("MatMulIntegerToFloat" in ops) == fuse
        out[fuse] = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    assert np.abs(out[True] - out[False]).max() < 1e-5


def test_int8_static_scales_that_fail_the_check_keep_dynamic_scales(narrow_ranges_cache):
    """Calibrated ranges far too narrow (values saturate) fail the probe check: the graph keeps scales
    computed per call and the engine runs one image per call."""
    import onnx

    folder = engines.onnx_graphs(TINY, True, narrow_ranges_cache)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["static_probe_min_cosine"] < 0.999 and meta["activation_scales"] == "dynamic"
    assert meta["accepted"] and meta["probe_min_cosine"] >= 0.999 and meta["images_per_call"] == 1
    assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(str(folder / "image.onnx")).graph.node}
    assert not (folder / "image-static.onnx").exists()
    engine = engines.OnnxEngine(TINY, quantized=True, cache_dir=narrow_ranges_cache)
    assert engine.precision == "int8" and engine.per_call == 1


def test_onnx_worker_never_imports_torch(cache):
    """A Spark worker with a cached graph embeds images with ONNX Runtime, PIL and numpy alone."""
    import subprocess
    import sys

    engines.onnx_graphs(TINY, True, cache)  # the export (here, in the test process, if not done) needs torch
    code = ("import sys, io, numpy as np; from PIL import Image; from lakelens import Embedder; "
            "from lakelens import ModelSpec; buf = io.BytesIO(); "
            "Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(buf, 'PNG'); "
            "r = Embedder(ModelSpec('lakelens-tiny'), engine=sys.argv[2], onnx_cache=sys.argv[1])([buf.getvalue()])[0]; "
            "print(r.embedding.shape, r.error, 'torch' in sys.modules, 'open_clip' in sys.modules)")
    for engine in ("onnx", "onnx-int8"):
        out = subprocess.run([sys.executable, "-c", code, cache, engine], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["(128,)", "None", "False", "False"]


def test_bf16_stays_close_to_fp32(contents, reference):
    # Forced here: on CPUs without native bf16 the torch-bf16 engine runs fp32 (emulated bf16 is slow).
    loaded = models.load(TINY)
    eng = engines.TorchEngine(loaded, dtype=torch.bfloat16, name="torch-bf16")
    # its own copy, cast once; the shared fp32 model other engines and the query side use is left as it was
    assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32} and eng.model is not loaded.model
    from lakelens.ingest.images import decode

    batch = torch.stack([loaded.preprocess(decode(c).image) for c in contents])
    images, texts = eng.encode_image(batch), eng.encode_text(loaded.tokenizer(TEXTS))
    assert eng.precision == "bf16" and images.dtype == np.float32
    # unit length in fp32 (normalised in bf16, lengths were off by up to 0.3%, a "cosine" of 0.997)
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert min_cos(images, reference[0]) >= 0.999 and min_cos(texts, reference[1]) >= 0.999
    assert not np.array_equal(images, reference[0])  # it really ran in bf16


@pytest.mark.parametrize("native, timing, precision", [
    (True, {"fp32_ms": 9.0, "bf16_ms": 2.5}, "bf16"),  # AMX: bf16 faster
    (True, {"fp32_ms": 9.0, "bf16_ms": 14.0}, "fp32"),  # AVX512-BF16 without AMX: native, yet slower
    (True, {"fp32_ms": 9.0, "bf16_ms": 9.0}, "fp32"),  # no faster: no reason to lose precision
    (False, None, "fp32"),  # emulated bf16: not even timed
])
def test_torch_bf16_engine_runs_bf16_only_where_its_probe_found_it_faster(native, timing, precision, contents,
                                                                         cache, reference, monkeypatch):
    probes = []
    monkeypatch.setattr(engines, "bf16_supported", lambda: native)
    monkeypatch.setattr(engines, "time_bf16", lambda *a, **kw: probes.append(a) or dict(timing))
    engines.load.cache_clear()  # engines made under these timings are not kept for other tests
    try:
        images, _, emb = embed_all("torch-bf16", contents, cache)
    finally:
        engines.load.cache_clear()
    assert emb.engine.name == "torch-bf16" and emb.engine.precision == precision
    assert emb.engine.timing == timing and len(probes) == (1 if native else 0)
    assert min_cos(images, reference[0]) >= (0.999 if precision == "bf16" else 0.99999)
    assert np.array_equal(images, reference[0]) == (precision == "fp32")  # bf16 really ran, or really did not


def test_torch_bf16_engine_times_its_probe_where_the_cpu_has_native_bf16(contents, cache, reference):
    images, _, emb = embed_all("torch-bf16", contents, cache)
    timing = emb.engine.timing
    assert (timing is None) == (not engines.bf16_supported())
    assert emb.engine.precision in ("bf16", "fp32") and (timing is not None or emb.engine.precision == "fp32")
    if timing is not None:
        assert set(timing) == {"fp32_ms", "bf16_ms"} and all(v > 0 for v in timing.values())
    assert min_cos(images, reference[0]) >= (0.999 if emb.engine.precision == "bf16" else 0.99999)


def test_onnx_cache_is_reused_and_rebuilt_when_the_weights_change(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    loaded = models.load(TINY)
    torch.save(loaded.model.state_dict(), ckpt)
    spec = ModelSpec("lakelens-tiny", str(ckpt))
    cache = tmp_path / "cache"

    def build():
        engines.load.cache_clear()  # a fresh worker process: only the disk cache survives
        return engines.get(spec, "onnx", "cpu", 1, str(cache))

    first = build()
    graph = first.folder / "image.onnx"
    mtime = graph.stat().st_mtime_ns
    assert engines.EXPORTS[(str(first.folder.parent), "fp32")] == 1
    second = build()
    assert second.folder == first.folder and graph.stat().st_mtime_ns == mtime
    assert engines.EXPORTS[(str(first.folder.parent), "fp32")] == 1  # loaded, not exported again
    assert not [p for p in first.folder.parent.iterdir() if p.name.startswith(".tmp-")]

    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    before = first.encode_image(x)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in loaded.model.state_dict().items()}
    torch.save(state, ckpt)
    os.utime(ckpt, ns=(mtime + 10**9, mtime + 10**9))  # a new file time, even on coarse-grained filesystems
    third = build()
    assert third.folder != first.folder and engines.EXPORTS[(str(third.folder.parent), "fp32")] == 1
    after = third.encode_image(x)
    torch_after = engines.TorchEngine(models.load(spec)).encode_image(x)
    assert min_cos(after, torch_after) >= 0.99999  # the new graph holds the new weights
    assert min_cos(after, before) < 0.999
    models.clear_cache()


def test_concurrent_exports_leave_one_complete_graph(tmp_path):
    """Two worker processes and two threads export and quantise into one empty cache at once."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    code = ("import sys; from lakelens.models import engines, registry as models; "
            "print(engines.onnx_graphs(models.ModelSpec('lakelens-tiny'), True, sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    outs = [out.strip().splitlines()[-1] for out, _ in outs]
    assert outs[0] == outs[1]
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda q: engines.onnx_graphs(TINY, q, tmp_path), (False, True)))
    assert str(folders[1]) == outs[0] and folders[0] == folders[1].parent / "fp32"
    assert sorted(p.name for p in folders[0].iterdir()) == ["image.onnx", "meta.json", "text.onnx"]
    assert sorted(p.name for p in folders[1].iterdir()) == ["image.onnx", "meta.json"]
    int8 = f"int8-w{engines.machine_int8_weight_bits()[0]}"
    assert sorted(p.name for p in folders[0].parent.iterdir()) == ["fp32", int8]  # no temp folders left
    for quantized in (False, True):
        engine = engines.OnnxEngine(TINY, quantized=quantized, cache_dir=tmp_path)
        assert engine.encode_image(np.zeros((1, 3, 64, 64), np.float32)).shape == (1, 128)


@pytest.mark.parametrize("cuda, gpus, requested, want", [
    (False, None, "auto", "cpu"),
    (False, ["0"], "auto", "cpu"),
    (True, None, "auto", "cuda:0"),
    (True, [], "auto", "cuda:0"),
    (True, ["3"], "auto", "cuda:3"),
    (True, ["2", "5"], "cuda", "cuda:2"),
    (True, ["1"], "cpu", "cpu"),
])
def test_choose_device(cuda, gpus, requested, want):
    assert engines.choose_device(cuda, gpus, requested) == want


def test_choose_device_errors():
    with pytest.raises(ConfigError, match="embed.device"):
        engines.choose_device(False, None, "cuda")
    with pytest.raises(ConfigError, match="embed.device"):
        engines.choose_device(True, None, "tpu")


def test_bad_engine_names_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("embed:\n  engine: tensorrt\n")
    with pytest.raises(ConfigError, match=r"embed\.engine.*torch, torch-bf16, onnx, onnx-int8"):
        config.load(f)
    with pytest.raises(ConfigError, match=r"embed\.engine"):
        Embedder(TINY, engine="onnx-fp8")
    assert config.load(None, ["embed.engine=onnx-int8"]).embed.engine == "onnx-int8"


def test_int8_source_rewrites_keep_the_towers_numbers(cache):
    """The int8 graph is traced with the patch embedding as a matrix product and self-attention as ONNX
    Runtime's fused Attention: in torch the rewritten tower gives the original's vectors, and the quantised
    graph holds the int8 forms (QAttention, no Conv)."""
    import onnx

    from lakelens.models import int8_source

    model = models.load(TINY).model
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(3, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        before = model.encode_image(x)
        with int8_source.rewritten(model.visual) as counts:
            after = model.encode_image(x)
            assert isinstance(model.visual.conv1, int8_source.PatchLinear)
        assert not isinstance(model.visual.conv1, int8_source.PatchLinear)  # put back
    assert counts == {"patch_linear": 1, "fused_attention": 4}
    assert torch.allclose(before, after, atol=1e-5)
    folder = engines.onnx_graphs(TINY, True, cache)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rewrites"] == {**counts, "batch": "dynamic"}
    nodes = onnx.load(str(folder / "image.onnx")).graph.node
    ops = {n.op_type for n in nodes}
    # every int8 product scales and adds its bias as it writes its output (fuse_integer_products)
    assert "QAttention" in ops and "Conv" not in ops and "MatMulIntegerToFloat" in ops and "MatMulInteger" not in ops
    # the patch embedding's product is int8 over the image's 8-bit pixels, recovered in the graph
    assert meta["fp32_nodes"] == [] and len(meta["pixel_int8_nodes"]) == 1
    patch = [n for n in nodes if n.name == meta["pixel_int8_nodes"][0] + "_int8_to_float"]
    assert [n.op_type for n in patch] == ["MatMulIntegerToFloat"]
    # ... which the graph takes as its input: no float normalisation in front of it
    graph = onnx.load(str(folder / "image.onnx"), load_external_data=False).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [("pixels", onnx.TensorProto.UINT8)]
    assert not {"Mul", "Round", "Clip"} & {n.op_type for n in nodes if "pixels" in n.input}
    assert meta["input"] == "pixels"


def test_pixel_int8_patch_product_recovers_the_pixels_exactly(tmp_path):
    """The int8 patch product sees the very 8-bit pixels the image was made of: preprocessed images whose
    pixels differ by one step give different vectors, and an image's vector does not move when its
    normalised values carry float32 rounding noise far below a pixel step."""
    loaded = models.load(TINY)
    t = loaded.transform
    engine = engines.OnnxEngine(TINY, quantized=True, cache_dir=str(tmp_path))
    assert engine.precision == "int8"
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    from PIL import Image

    x = t(Image.fromarray(pixels))[None]
    noisy = x * (1 + np.float32(1e-6) * rng.standard_normal(x.shape).astype(np.float32))
    assert np.array_equal(engine.encode_image(x), engine.encode_image(noisy))
    bumped = pixels.copy()
    bumped[:8, :8] = np.where(bumped[:8, :8] < 255, bumped[:8, :8] + 1, 254)
    assert not np.array_equal(engine.encode_image(x), engine.encode_image(t(Image.fromarray(bumped))[None]))
    # the graph takes the pixels themselves: fed them, or the float input they make, it gives the same vector
    assert engine.takes_pixels
    assert np.array_equal(t.to_pixels(x), t.pixels(Image.fromarray(pixels))[None])
    assert np.array_equal(engine.encode_image(t.pixels(Image.fromarray(pixels))[None]), engine.encode_image(x))


def test_embedder_feeds_the_int8_tower_pixels_and_the_fp32_graph_floats(tmp_path):
    """The Embedder hands an engine that takes pixels the uint8 pixels (no normalisation in the worker),
    and every other engine the float input; an image's vector is the same either way it is fed."""
    from lakelens.ingest import images

    data = encode(noise_image(3, (72, 80)), "JPEG")
    int8 = Embedder(TINY, engine="onnx-int8", onnx_cache=str(tmp_path), threads=1)
    fp32 = Embedder(TINY, engine="onnx", onnx_cache=str(tmp_path), threads=1)
    img = images.decode(data, int8.engine.image_size).image
    assert int8.transform(img).dtype == np.uint8 and fp32.transform(img).dtype == np.float32
    assert np.array_equal(fp32.transform(img), fp32.engine.transform(img))
    (got,) = int8([data])
    assert np.array_equal(got.embedding, int8.engine.encode_image(fp32.transform(img)[None])[0])
    assert np.array_equal(fp32.engine.encode_image(int8.transform(img)[None]),
                          fp32.engine.encode_image(fp32.transform(img)[None]))


def test_patch_linear_matches_the_convolution_and_other_attention_is_left_alone():
    from lakelens.models import int8_source

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8, bias=True)
    x = torch.randn(2, 3, 70, 53)  # sizes the stride does not divide: the convolution drops the rest
    with torch.no_grad():
        assert torch.allclose(conv(x), int8_source.PatchLinear(conv)(x), atol=1e-5)
    assert not int8_source.PatchLinear.applies(torch.nn.Conv2d(3, 16, kernel_size=8, stride=4))
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    fused = int8_source.FusedSelfAttention(mha)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.allclose(fused(q, q, q)[0], mha(q, q, q, need_weights=False)[0], atol=1e-5)
        assert torch.allclose(fused(q, kv, kv)[0], mha(q, kv, kv)[0])  # cross-attention: the module itself
    assert not int8_source.FusedSelfAttention.applies(torch.nn.MultiheadAttention(32, 4, batch_first=False))
