"""Benchmark: the embed job per inference engine (whole command, Spark start included, and marginal
per-image rate) against a plain single-process open_clip loop and `clip-retrieval inference`, same images
and random-init weights, in one run, for 256-px and 12-megapixel JPEGs; plus the machine's matmul rate and
the model's FLOPs per image. Writes bench/results/embed.json.

The marginal rate comes from one run over a larger set in several chunks: files of chunks 2.. over their
embed + commit seconds (EmbedStats.chunk_seconds), so Spark's and the workers' start-up are left out and
every per-chunk cost (scan, Arrow, UDF, Delta MERGE) is in.

    .venv/bin/python bench/embed.py [--model ViT-B-32] [--small 500] [--marginal 1000 --chunk 250]
                                    [--chunk-seconds S] [--fixed-chunks-too]
                                    [--large 96 --large-marginal 750 --large-chunk 250]

Both marginal runs start with chunks of 250 files (the default chunk_size is 2000); later chunks follow
the job's embed.chunk_seconds (--chunk-seconds; 0: all chunks of --chunk files, so each chunk's fixed Delta
MERGE cost is charged at least as heavily as in a default run). --fixed-chunks-too adds a second marginal
run of the 256-px set with fixed chunks, for the ratio of the two in one run. The 12-MP marginal set is
made of hard links to the 96 distinct 12-MP files under new names (the job keys rows by path, so every
link is read, decoded and embedded); like the plain loop, it reads them from the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import SMOKE_HELP, ProcessTreeCPU, best_rate, describe, ort_int8_rate, side, smoke  # bench/ on the path
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def photo_like(seed: int, w: int, h: int) -> Image.Image:
    """Smooth gradients, shapes and grain: compresses like a photo (a 12 MP one to a few MB)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(w // 40, w // 6))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1, w // 800)))
    grain = rng.normal(0, 6, (h, w, 1)).astype(np.int16)
    arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_images(folder: Path, n: int, w: int, h: int, quality: int = 90) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"photo{i:05d}.jpg"
        photo_like(i, w, h).save(p, quality=quality)
        paths.append(p)
    return paths


def plain_loop(paths: list[Path], model_name: str, batch: int = 32) -> dict:
    """The baseline: PIL open + open_clip preprocess + torch forward, one process, batch 32."""
    from lakelens.models import registry as models

    oc = models._open_clip()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, _, preprocess = oc.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    load_s = time.perf_counter() - t0
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            v = model.encode_image(x)
            out.append((v / v.norm(dim=-1, keepdim=True)).numpy())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images_per_s": len(paths) / seconds, "model_load_s": load_s,
            "vectors": np.concatenate(out)}


def compare(plain_vectors: np.ndarray, paths: list[Path], rows: dict) -> dict:
    by_name = {path.rsplit("/", 1)[-1]: v for path, v in rows.items()}  # the job read hard links elsewhere
    spark_vectors = np.stack([by_name[p.name] for p in paths])
    cos = (plain_vectors * spark_vectors).sum(1)
    return {"max_abs_diff": float(np.abs(plain_vectors - spark_vectors).max()), "min_cosine": float(cos.min())}


def compute_bounds(model_name: str) -> dict:
    """Matmul rate of this machine (fp32 and bf16, all cores) and the image tower's FLOPs per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from lakelens.models import engines
    from lakelens.models import registry as models

    out = {}
    for name, dtype, n in (("fp32", torch.float32, side(2048)), ("bf16", torch.bfloat16, side(512))):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[f"matmul_{name}_gflops"] = best_rate(lambda: a @ b, 2 * n ** 3, 3.0)
    out["bf16_native"] = engines.bf16_supported()
    n = side(2048)
    q = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    try:  # int8 x int8 -> int32 products (VNNI where the CPU has it)
        out["matmul_int8_torch_gops"] = best_rate(lambda: torch._int_mm(q, q), 2 * n ** 3, 3.0)
    except (RuntimeError, AttributeError):
        out["matmul_int8_torch_gops"] = None
    # the int8 engine's own kernel family (ONNX Runtime uint8 x int8); the bound is the faster of the two
    out["matmul_int8_ort_gops"] = ort_int8_rate(n, seconds=3.0)
    rates = {k: out[k] for k in ("matmul_int8_torch_gops", "matmul_int8_ort_gops") if out[k]}
    out["matmul_int8_gops"] = max(rates.values()) if rates else None
    out["matmul_int8_kernel"] = max(rates, key=rates.get) if rates else None
    loaded = models.load(models.ModelSpec(model_name))
    # nn.MultiheadAttention's fused inference path is invisible to FlopCounterMode (it would miss the
    # attention projections, a third of a ViT's FLOPs); the unfused path computes the same thing.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            loaded.model.encode_image(torch.zeros(1, 3, loaded.image_size, loaded.image_size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    out["gflop_per_image"] = round(fc.get_total_flops() / 1e9, 2)
    return out


def model_rates(spec, paths: list[Path], engine_names: list[str], cache: Path, bounds: dict) -> dict:
    """Model-only images/s per engine (preprocessed batch of 32, all cores; the median of five passes) and the
    fraction of the bound. Each engine is fed what the job's workers feed it: the Embedder's own transform
    (8-bit pixels for the int8 tower, float model input otherwise)."""
    from lakelens import Embedder

    out = {}
    for name in engine_names:
        emb = Embedder(spec, batch_size=32, engine=name, onnx_cache=str(cache))
        tensors = [emb.transform(Image.open(p).convert("RGB")) for p in paths[:32]]
        emb.embed_tensors(tensors[:4])
        passes = []
        for _ in range(5):  # the median of five passes: one pass of 32 images moves with the machine's load
            t0 = time.perf_counter()
            emb.embed_tensors(tensors)
            passes.append(32 / (time.perf_counter() - t0))
        rate = float(np.median(passes))
        precision = emb.engine.precision
        key = {"bf16": "matmul_bf16_gflops", "int8": "matmul_int8_gops"}.get(precision, "matmul_fp32_gflops")
        if bounds.get(key) is None:
            key = "matmul_fp32_gflops"
        bound = bounds[key] / bounds["gflop_per_image"]
        out[name] = {"precision": precision, "images_per_s": round(rate, 2),
                     "passes_images_per_s": [round(r, 2) for r in passes],
                     "bound_kind": key, "bound_images_per_s": round(bound, 2), "fraction_of_bound": round(rate / bound, 3)}
        if precision == "int8":
            out[name]["weight_bits"] = emb.engine.weight_bits
        print(f"  model only {name}: {rate:.2f} img/s ({emb.engine.precision})", flush=True)
    return out


def lakelens_command(folder: Path, table: Path, ckpt: Path, model_name: str, engine: str, cache: Path,
                     chunk_size: int | None = None, chunk_seconds: float | None = None, sample_cpu: bool = False) -> dict:
    """The whole `lakelens embed` command in a fresh process: Spark start, workers, model load, commits. With
    `sample_cpu`, also the CPU-seconds of its JVM, Python workers and driver (machine.ProcessTreeCPU)."""
    cmd = [str(ROOT / ".venv" / "bin" / "lakelens"), "embed", "--images", str(folder), "--table", str(table),
           "--model", model_name, "--pretrained", str(ckpt), "--engine", engine,
           "--conf", str(ROOT / "conf" / "local.yaml"), "--set", f"embed.onnx_cache={cache}", "--json"]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    if chunk_seconds is not None:
        cmd += ["--set", f"embed.chunk_seconds={chunk_seconds}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = ProcessTreeCPU(proc.pid) if sample_cpu else None
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"lakelens embed failed: {stderr[-2000:]}")
    stats = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "embedded": stats["embedded"], "phases": stats["phases"],
            "chunk_seconds": stats["chunk_seconds"], **({"cpu": sampler.stop()} if sampler else {})}


def marginal_rate(chunk_seconds: list) -> float:
    """Images per second over chunks 2..: embed + commit, without the first chunk's worker start."""
    later = chunk_seconds[1:]
    return sum(n for n, *_ in later) / sum(e + c for _, e, c in later)


CLIPRET_VENV = ROOT / "bench" / ".venv-clipret"


def ensure_clip_retrieval() -> Path:
    """clip-retrieval from PyPI in its own venv; torch and friends come from lakelens' venv through a .pth
    file (pip installs only what is missing or conflicting, into the bench venv)."""
    py = CLIPRET_VENV / "bin" / "python"
    if not (CLIPRET_VENV / "bin" / "clip-retrieval").exists():
        subprocess.run([sys.executable, "-m", "venv", str(CLIPRET_VENV)], check=True)
        site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        main_site = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "zz-lakelens-venv.pth").write_text(main_site + "\n")
        subprocess.run([str(CLIPRET_VENV / "bin" / "pip"), "install", "-q", "clip-retrieval==2.45.0",
                        "setuptools<81"], check=True)  # clip-anytorch imports pkg_resources
    return CLIPRET_VENV / "bin" / "clip-retrieval"


def clip_retrieval(folder: Path | str, out: Path, ckpt: Path, model_name: str, n: int, extra: tuple = ()) -> dict:
    """`clip-retrieval inference` on the same images (a folder, or with `extra` such as `--input_format
    webdataset` a shard pattern): open_clip:NAME/CHECKPOINT loads the same local weights."""
    exe = ensure_clip_retrieval()
    cmd = [str(exe), "inference", "--input_dataset", str(folder), *extra, "--output_folder", str(out),
           "--clip_model", f"open_clip:{model_name}/{ckpt}", "--enable_text", "False",
           "--batch_size", "32", "--num_prepro_workers", "2", "--use_jit", "False"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode:
        return {"error": f"exit {res.returncode}: {res.stderr[-1500:]}", "command": " ".join(cmd)}
    embs = sorted(out.glob("img_emb/*.npy"))
    count = int(sum(np.load(e).shape[0] for e in embs))
    return {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 3), "embeddings_written": count,
            "command": " ".join(cmd)}


def run_set(name: str, paths: list[Path], folder: Path, ckpt: Path, model_name: str, engine_names: list[str],
            work: Path, cache: Path, with_clip_retrieval: bool, big: Path, chunk: int, plain_n: int = 0,
            model_only: dict | None = None, model_only_again=None, chunk_seconds: float | None = None,
            fixed_too: bool = False) -> dict:
    """`paths` (in `folder`) for whole commands; the first `plain_n` of them (all: 0) for the plain loop and
    parity; `big` (a superset, in chunks of `chunk`) for the marginal rate."""
    n = len(paths)
    n_big = len(list(big.iterdir()))
    sample = paths[:plain_n] if plain_n else paths
    runs = [plain_loop(sample, model_name) for _ in range(3)]
    plain = sorted(runs, key=lambda r: r["images_per_s"])[1]  # the median of three
    print(f"  {name}: plain loop {[round(r['images_per_s'], 2) for r in runs]} img/s", flush=True)
    out = {"images": n, "plain_loop_images": len(sample), "image_size": list(Image.open(paths[0]).size),
           "mean_file_bytes": int(np.mean([p.stat().st_size for p in paths])),
           "plain_loop_images_per_s": round(plain["images_per_s"], 3),
           "plain_loop_runs_images_per_s": [round(r["images_per_s"], 3) for r in runs],
           "marginal_run": {"images": n_big, "chunk_size": chunk,
                            "chunk_seconds": "the job's default" if chunk_seconds is None else chunk_seconds},
           "engines": {}}
    for engine in engine_names:
        full = lakelens_command(folder, work / f"t-{name}-{engine}", ckpt, model_name, engine, cache)
        rows = read_table(work / f"t-{name}-{engine}")
        parity = compare(plain["vectors"], sample, rows)
        shutil.rmtree(work / f"t-{name}-{engine}", ignore_errors=True)
        many = lakelens_command(big, work / f"t-{name}-{engine}-big", ckpt, model_name, engine, cache, chunk,
                                chunk_seconds)
        shutil.rmtree(work / f"t-{name}-{engine}-big", ignore_errors=True)
        marginal = marginal_rate(many["chunk_seconds"])
        fixed = None
        if fixed_too:  # the same run with every chunk of `chunk` files, right after
            fixed = lakelens_command(big, work / f"t-{name}-{engine}-fixed", ckpt, model_name, engine, cache,
                                     chunk, 0)
            shutil.rmtree(work / f"t-{name}-{engine}-fixed", ignore_errors=True)
            fixed_rate = marginal_rate(fixed["chunk_seconds"])
        # model only again, right after the marginal run: the job's share is taken against the median of
        # the passes before and after it, so one slow spell of a shared machine does not set the ratio
        again = model_only_again(engine) if model_only_again and model_only and engine in model_only else None
        if again:
            passes = model_only[engine]["passes_images_per_s"] + again["passes_images_per_s"]
            model_only[engine]["passes_after_marginal_images_per_s"] = again["passes_images_per_s"]
            model_only[engine]["images_per_s_before_and_after"] = round(float(np.median(passes)), 2)
        out["engines"][engine] = {
            "whole_command_s": full["seconds"], "whole_command_images_per_s": round(n / full["seconds"], 3),
            "whole_over_plain": round(n / full["seconds"] / plain["images_per_s"], 3),
            "phases_s": {k: round(v, 2) for k, v in full["phases"].items()},
            # process and Spark start, the lock, the run's last table read, Spark's stop
            "outside_phases_s": round(full["seconds"] - sum(full["phases"].values()), 2),
            "marginal_images_per_s": round(marginal, 3),
            "marginal_over_plain": round(marginal / plain["images_per_s"], 3),
            "marginal_over_model_only": (round(marginal / model_only[engine]["images_per_s"], 3)
                                         if model_only and engine in model_only else None),
            "marginal_over_model_only_before_and_after": (
                round(marginal / model_only[engine]["images_per_s_before_and_after"], 3) if again else None),
            "marginal_run_whole_command_s": many["seconds"], "marginal_run_chunk_seconds": many["chunk_seconds"],
            "parity_vs_plain": parity}
        if fixed:
            out["engines"][engine]["fixed_chunks"] = {
                "marginal_images_per_s": round(fixed_rate, 3),
                "marginal_over_plain": round(fixed_rate / plain["images_per_s"], 3),
                "marginal_over_model_only_before_and_after": (
                    round(fixed_rate / model_only[engine]["images_per_s_before_and_after"], 3) if again else None),
                "whole_command_s": fixed["seconds"], "chunk_seconds": fixed["chunk_seconds"],
                "sized_by_time_over_fixed": round(marginal / fixed_rate, 3)}
            print(f"  {name} {engine}: fixed chunks of {chunk}: marginal {fixed_rate:.2f} img/s; sized by time "
                  f"{marginal / fixed_rate:.3f}x that", flush=True)
        print(f"  {name} {engine}: whole {n / full['seconds']:.2f} img/s ({full['seconds']:.1f} s), "
              f"marginal {marginal:.2f} img/s ({marginal / plain['images_per_s']:.2f}x plain), "
              f"min cos {parity['min_cosine']:.6f}", flush=True)
    if with_clip_retrieval:
        cr = clip_retrieval(folder, work / f"cr-{name}", ckpt, model_name, n)
        out["clip_retrieval"] = cr
        print(f"  {name} clip-retrieval: {cr}", flush=True)
        if "seconds" in cr:
            best = min(out["engines"], key=lambda e: out["engines"][e]["whole_command_s"])
            out["best_engine"] = best
            out["best_whole_over_clip_retrieval_time"] = round(
                out["engines"][best]["whole_command_s"] / cr["seconds"], 3)
    return out


def linked_subset(paths: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.link(p, folder / p.name)
    return folder


def repeated_links(paths: list[Path], folder: Path, n: int) -> Path:
    """`n` hard links to `paths` in turn, each under its own name."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.link(paths[i % len(paths)], folder / f"copy{i:05d}-{paths[i % len(paths)].name}")
    return folder


def read_table(table: Path) -> dict:
    """path -> vector of the table the command wrote, read by delta-rs (no Spark session of our own)."""
    from deltalake import DeltaTable

    rows = DeltaTable(str(table)).to_pyarrow_table(columns=["path", "embedding"]).to_pydict()
    return {p: np.array(v, dtype=np.float32) for p, v in zip(rows["path"], rows["embedding"])}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--small", type=int, default=500, help="256x256 JPEGs in the whole-command set")
    ap.add_argument("--marginal", type=int, default=1000, help="256x256 JPEGs in the marginal-rate run")
    ap.add_argument("--chunk", type=int, default=250, help="(first) chunk size of the marginal-rate run")
    ap.add_argument("--chunk-seconds", type=float, default=None,
                    help="embed.chunk_seconds of the marginal-rate runs (default: the job's; 0: fixed chunks)")
    ap.add_argument("--fixed-chunks-too", action="store_true",
                    help="also run the 256-px marginal run with fixed chunks (embed.chunk_seconds=0)")
    ap.add_argument("--large", type=int, default=96, help="4000x3000 (12 MP) JPEGs (whole command: a third)")
    ap.add_argument("--large-marginal", type=int, default=750,
                    help="12-MP files in the marginal-rate run (hard links to the distinct ones)")
    ap.add_argument("--large-chunk", type=int, default=250)
    ap.add_argument("--engines", default="torch,onnx,onnx-int8",
                    help="engines run as whole jobs (all four are measured model-only)")
    ap.add_argument("--no-clip-retrieval", action="store_true")
    ap.add_argument("--plain", type=int, default=0,
                    help="run the plain loop (and parity) on the first N files of the whole-command set (0: all)")
    ap.add_argument("--no-large", action="store_true", help="skip the 12-MP set")
    ap.add_argument("--out", default=str(RESULTS / "embed.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    # a smoke run: lakelens-tiny, one engine, two fixed chunks (the 12-MP set runs the same code at another size)
    smoke(args, model="lakelens-tiny", small=6, marginal=8, chunk=4, chunk_seconds=0, engines="onnx-int8",
          no_clip_retrieval=True, no_large=True)

    from lakelens.models import engines
    from lakelens.models import registry as models

    engine_names = args.engines.split(",")
    work = Path(tempfile.mkdtemp(prefix="lakelens-bench-"))
    results = {"what": "lakelens embed per engine (whole command in a fresh process incl. Spark start, and the "
                       "marginal rate over chunks 2.. of a larger run) vs a plain single-process open_clip loop "
                       "(PIL + preprocess + torch forward, batch 32, all cores) and clip-retrieval inference "
                       f"(batch 32, 2 preprocessing workers), random-init {args.model} from one checkpoint file",
               "loadavg_before": loadavg(),
               "machine": {**describe(), "cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": sys.version.split()[0], "torch": torch.__version__}, "model": args.model,
               "args": vars(args)}
    print(f"[bench] machine: {json.dumps(results['machine'])}", flush=True)
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        print(f"[bench] images and checkpoint in {work}", flush=True)
        small_all = make_images(work / "small-all", max(args.small, args.marginal), 256, 256)
        results["conf"] = (ROOT / "conf" / "local.yaml").read_text()
        small = small_all[:args.small]
        large_all = [] if args.no_large else make_images(work / "large-all", args.large, 4000, 3000)
        large = large_all[:max(1, args.large // 3)]
        ckpt = work / f"{args.model}-random-seed0.pt"
        torch.save(models.load(models.ModelSpec(args.model)).model.state_dict(), ckpt)
        cache = work / "onnx-cache"
        from lakelens import jvm

        archive = jvm.build()  # what `make setup` builds: every Spark JVM of the commands below maps it
        results["jvm_class_archive"] = archive.name if archive is not None else None
        results["compute"] = bounds = compute_bounds(args.model)
        print(f"[bench] compute: {bounds}", flush=True)
        t0 = time.perf_counter()
        # the spec as the command resolves --pretrained (pinned by the checkpoint's digest), so the graphs
        # exported here are the ones the timed commands find: the one-time export stays out of them
        spec = models.ModelSpec(args.model, str(ckpt)).with_digest()
        engines.onnx_graphs(spec, True, cache)
        results["onnx_export_and_int8_s"] = round(time.perf_counter() - t0, 1)
        results["int8_check"] = json.loads((engines.onnx_graphs(spec, True, cache) / "meta.json").read_text())
        results["model_only"] = model_rates(spec, small, list(engines.ENGINES), cache, bounds)
        print("[bench] 256-px JPEGs", flush=True)
        results["small_256px"] = run_set(
            "small", small, linked_subset(small, work / "small"), ckpt, args.model, engine_names, work, cache,
            not args.no_clip_retrieval, linked_subset(small_all[:args.marginal], work / "small-big"), args.chunk,
            args.plain, results["model_only"],
            lambda engine: model_rates(spec, small, [engine], cache, bounds)[engine], args.chunk_seconds,
            args.fixed_chunks_too)
        if args.no_large:
            results["loadavg_after"] = loadavg()
            return finish(results, args.out)
        print("[bench] 12-megapixel JPEGs", flush=True)
        results["large_12mp"] = run_set(
            "large", large, linked_subset(large, work / "large"), ckpt, args.model, engine_names, work, cache,
            False, repeated_links(large_all, work / "large-big", args.large_marginal), args.large_chunk,
            chunk_seconds=args.chunk_seconds)
        results["loadavg_after"] = loadavg()
        return finish(results, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finish(results: dict, out: str) -> int:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
