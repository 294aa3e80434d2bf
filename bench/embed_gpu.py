"""Benchmark, GPU part (issue #15): on a CUDA GPU, lakelens' embedder core (lakelens.Embedder, the code
the embed job's pandas UDF runs per partition: threaded decode + numpy preprocess + fp16 autocast) against
a plain open_clip loop in fp32 and `clip-retrieval inference` on the same GPU and files, in one run, with
random-init weights from one checkpoint file. Writes bench/results/embed_gpu.json.

- GPU and CPU: names, torch matmul rates (fp32 without TF32, fp16, bf16), CPU flags.
- Model only: images/s of the image tower in fp32 and in fp16 autocast (what lakelens runs on a GPU) at
  `--batch`, on preprocessed images already on the GPU; per-image cosine of fp16 to fp32.
- Files to vectors, each as a whole command in a fresh process (interpreter, imports, model load, files),
  on two set sizes, so the marginal rate (images per second between the two sizes) leaves start-up out:
  lakelens core (`--core-run`, Embedder.stream over the folder), clip-retrieval (its inference function, as
  its CLI calls it: files reader, DataLoader with `--workers` processes, bf16 autocast on this GPU) and the
  plain loop (PIL + open_clip preprocess + fp32 forward, one process).
- Parity: per-image cosine of lakelens' fp16 vectors to the plain fp32 loop's and to clip-retrieval's.

The Spark job itself is not run here (the GPU machines of this workplace have no JVM); its per-partition
work is the core measured here. clip-retrieval needs open_clip < 3, so it runs with its own packages first
on the path (`--cr-path`).

    python bench/embed_gpu.py [--model ViT-B-32] [--files 2000,6000] [--batch 256] [--workers 16]
                              [--cr-path /tmp/cr]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# "cpu" only for a dry run of the script itself on a machine without a GPU (LAKELENS_BENCH_DEVICE=cpu)
DEVICE = os.environ.get("LAKELENS_BENCH_DEVICE", "cuda")
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "lib"))

from machine import SMOKE_HELP, smoke  # noqa: E402


def _make(args):
    from embed import photo_like  # bench/embed.py: photo-like 256-px JPEGs, as in the CPU benchmark

    folder, i = args
    photo_like(i, 256, 256).save(Path(folder) / f"photo{i:05d}.jpg", quality=90)


def make_images(folder: Path, n: int, workers: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make, [(str(folder), i) for i in range(n)], chunksize=64))
    return sorted(folder.glob("*.jpg"))


def gpu_rates(torch) -> dict:
    """torch matmul rates on the GPU: TFLOP/s, best of 10 after warm-up (8192^3, fp16/bf16; 4096^3 fp32)."""
    out = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dtype, n in (("fp32", torch.float32, 4096), ("fp16", torch.float16, 8192), ("bf16", torch.bfloat16, 8192)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        a @ a
        best = float("inf")
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ a
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        out[f"matmul_{name}_tflops"] = round(2 * n ** 3 / best / 1e12, 1)
    return out


def describe(torch) -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
            "capability": list(torch.cuda.get_device_capability(0)), "multiprocessors": props.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu, "cpu_cores": os.cpu_count(),
            "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags],
            "platform": platform.platform(), "python": sys.version.split()[0], **gpu_rates(torch)}


def model_only(spec, paths: list[Path], batch: int) -> dict:
    """Image tower alone, on one preprocessed batch already on the GPU: fp32 and fp16 autocast images/s
    (best of 5 timed rounds of 10 calls) and the per-image cosine of fp16 to fp32."""
    import torch
    from PIL import Image

    from lakelens.models import registry

    loaded = registry.load(spec)
    model = loaded.model.to(DEVICE).eval()
    x = torch.stack([loaded.preprocess(Image.open(p).convert("RGB")) for p in paths[:batch]]).to(DEVICE)
    out, vectors = {}, {}
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    for name, dtype in (("fp32", None), ("fp16", torch.float16)):
        fp16 = dtype is not None and DEVICE == "cuda"
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=dtype or torch.bfloat16, enabled=fp16):
            def run():
                return model.encode_image(x, normalize=True).float()
            vectors[name] = run().cpu().numpy()
            best = float("inf")
            for _ in range(5):
                sync()
                t0 = time.perf_counter()
                for _ in range(10):
                    run()
                sync()
                best = min(best, (time.perf_counter() - t0) / 10)
        out[name] = {"images_per_s": round(batch / best, 1), "ms_per_batch": round(best * 1000, 2)}
    cos = (vectors["fp32"] * vectors["fp16"]).sum(1)
    out["fp16_over_fp32"] = round(out["fp16"]["images_per_s"] / out["fp32"]["images_per_s"], 2)
    out["fp16_cosine_to_fp32"] = {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}
    out["batch"] = batch
    model.cpu()
    return out


# --- the three whole commands -----------------------------------------------------------------------
def core_run(folder: str, out: str, model: str, ckpt: str, batch: int, workers: int) -> None:
    """In a fresh process: lakelens' Embedder over every file of `folder`, as the UDF runs it; vectors and
    the embedding loop's own seconds to `out`."""
    from lakelens import Embedder, ModelSpec

    t0 = time.perf_counter()
    emb = Embedder(ModelSpec(model, ckpt), batch_size=batch, decode_threads=workers, device=DEVICE)
    emb([Path(next(Path(folder).glob("*.jpg"))).read_bytes()])  # CUDA context and kernels, as a task's first batch
    load_s = time.perf_counter() - t0
    paths = sorted(Path(folder).glob("*.jpg"))
    t0, start = time.perf_counter(), time.time()
    batches = ((i, [p.read_bytes() for p in paths[i:i + batch]]) for i in range(0, len(paths), batch))
    vectors = [r.embedding for _, results in emb.stream(batches) for r in results]
    loop_s, end = time.perf_counter() - t0, time.time()
    np.save(out, np.stack(vectors))
    Path(out + ".json").write_text(json.dumps({"load_s": load_s, "loop_s": loop_s, "precision": emb.engine.precision,
                                               "names": [p.name for p in paths], "start": start, "end": end}))


def shared_gpu(me: list[str], paths: list[Path], work: Path, k: int, cores: int) -> dict:
    """`k` core processes at once on one GPU, each over 1/k of the files with cores/k decode threads: what
    Spark runs with spark.task.resource.gpu.amount = 1/k (each task a Python worker with its own model)."""
    procs = []
    t0 = time.perf_counter()
    for j in range(k):
        folder = work / f"share{k}-{j}"
        folder.mkdir()
        for p in paths[j::k]:
            os.link(p, folder / p.name)
        cmd = me + ["--workers", str(max(1, cores // k)), "--core-run", str(folder), str(work / f"share{k}-{j}.npy")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1][-1500:] for p in procs if p.wait(timeout=600)]
    whole = time.perf_counter() - t0
    if errors:
        return {"error": errors[0]}
    runs = [json.loads((work / f"share{k}-{j}.npy.json").read_text()) for j in range(k)]
    span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"processes": k, "decode_threads_each": max(1, cores // k), "whole_s": round(whole, 2),
            "loop_span_s": round(span, 2), "aggregate_loop_images_per_s": round(len(paths) / span, 1),
            "whole_images_per_s": round(len(paths) / whole, 1)}


def plain_run(folder: str, out: str, model: str, ckpt: str, batch: int) -> None:
    """In a fresh process: PIL open + open_clip preprocess + fp32 forward, batch `batch`, one process."""
    import open_clip
    import torch
    from PIL import Image

    model_, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=ckpt, device=DEVICE)
    model_.eval()
    paths = sorted(Path(folder).glob("*.jpg"))
    vectors = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch]]).to(DEVICE)
            vectors.append(model_.encode_image(x, normalize=True).cpu().numpy())
    np.save(out, np.concatenate(vectors))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    seconds = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exit {res.returncode}: {res.stderr[-3000:]}")
    return seconds, res.stdout + res.stderr


def clip_retrieval_run(folder: Path, work: Path, model: str, ckpt: Path, batch: int, workers: int,
                       cr_path: str) -> tuple[float, dict]:
    code = ("from clip_retrieval.clip_inference.main import main; "
            f"main(input_dataset={str(folder)!r}, output_folder={str(work)!r}, input_format='files', "
            f"clip_model='open_clip:{model}/{ckpt}', enable_text=False, enable_metadata=False, "
            f"batch_size={batch}, num_prepro_workers={workers}, use_jit=False, enable_wandb=False)")
    pythonpath = os.pathsep.join(filter(None, [cr_path, os.environ.get("PYTHONPATH")]))
    seconds, log = timed([sys.executable, "-c", code], {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1",
                                                         "WANDB_MODE": "disabled"})
    import pyarrow.parquet as pq

    names = [Path(p).name for p in pq.read_table(next(work.glob("metadata/*.parquet")))["image_path"].to_pylist()]
    vectors = np.concatenate([np.load(f) for f in sorted(work.glob("img_emb/*.npy"))])
    return seconds, {"vectors": dict(zip(names, vectors, strict=True)), "log_tail": log[-600:]}


def cosine(a: np.ndarray, b: np.ndarray) -> dict:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    return {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}


def marginal(small: tuple[int, float], big: tuple[int, float]) -> float:
    return round((big[0] - small[0]) / (big[1] - small[1]), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--files", default="2000,6000", help="two set sizes; the marginal rate is between them")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model-only", default="ViT-B-32,ViT-L-14", help="architectures timed model-only (random init)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--cr-path", default="", help="folder of clip-retrieval and open_clip<3 (first on its path)")
    ap.add_argument("--out", default=str(RESULTS / "embed_gpu.json"))
    ap.add_argument("--core-run", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--plain-run", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--shares", default="", help="only this: k core processes sharing the GPU, e.g. 1,4,8,16")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP + "; without a GPU it only says so")
    args = ap.parse_args()
    smoke_run = smoke(args, files="16,32", batch=16, model_only="ViT-B-32", workers=min(4, args.workers))
    if args.core_run:
        core_run(*args.core_run, args.model, args.ckpt, args.batch, args.workers)
        return 0
    if args.plain_run:
        plain_run(*args.plain_run, args.model, args.ckpt, args.batch)
        return 0

    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench/embed_gpu.py: torch sees no CUDA device here; the GPU part runs only on a GPU machine")
        return 0 if smoke_run else 2
    from lakelens import ModelSpec
    from lakelens.models import registry

    sizes = [int(s) for s in args.files.split(",")]
    machine = describe(torch) if DEVICE == "cuda" else {"device": DEVICE}
    results = {"what": __doc__.split("\n\n")[0], "machine": machine, "model": args.model,
               "batch": args.batch, "workers": args.workers, "files": sizes}
    print(json.dumps(results["machine"]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="lakelens-gpu-"))
    all_paths = make_images(work / "all", max(sizes), args.workers)
    folders = {}
    for n in sizes:
        folders[n] = work / f"set{n}"
        folders[n].mkdir()
        for p in all_paths[:n]:
            os.link(p, folders[n] / p.name)
    torch.manual_seed(0)
    ckpt = work / f"{args.model}-random-seed0.pt"
    torch.save(registry.load(ModelSpec(args.model)).model.state_dict(), ckpt)
    me = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--ckpt", str(ckpt),
          "--batch", str(args.batch)]
    if args.shares:
        big = all_paths[:max(sizes)]
        timed(me + ["--core-run", str(folders[sizes[0]]), str(work / "warm.npy")])  # page cache
        results["shared_gpu"] = {}
        for k in (int(x) for x in args.shares.split(",")):
            results["shared_gpu"][k] = shared_gpu(me, big, work, k, os.cpu_count() or 1)
            print(f"{k} processes share the GPU: {results['shared_gpu'][k]}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        return 0
    me += ["--workers", str(args.workers)]
    results["model_only"] = {}
    for name in args.model_only.split(","):
        spec = ModelSpec(args.model, str(ckpt)) if name == args.model else ModelSpec(name)
        results["model_only"][name] = model_only(spec, all_paths, args.batch)
        print(f"model only {name}:", json.dumps(results["model_only"][name]), flush=True)

    runs: dict = {"lakelens_core": {}, "clip_retrieval": {}, "plain_loop_fp32": {}}
    vectors: dict = {}
    # one untimed run of each on the small set first: page cache, and the first process's one-time costs
    timed(me + ["--core-run", str(folders[sizes[0]]), str(work / "warm.npy")])
    try:
        clip_retrieval_run(folders[sizes[0]], work / "cr-warm", args.model, ckpt, args.batch, args.workers, args.cr_path)
    except (RuntimeError, StopIteration):
        pass
    for n in sizes:
        out = str(work / f"core{n}.npy")
        seconds, _ = timed(me + ["--core-run", str(folders[n]), out])
        inner = json.loads(Path(out + ".json").read_text())
        vectors[("core", n)] = dict(zip(inner["names"], np.load(out), strict=True))
        runs["lakelens_core"][n] = {"whole_command_s": round(seconds, 2), "load_s": round(inner["load_s"], 2),
                                    "loop_s": round(inner["loop_s"], 2), "precision": inner["precision"],
                                    "loop_images_per_s": round(n / inner["loop_s"], 1)}
        print(f"lakelens core, {n} files: {runs['lakelens_core'][n]}", flush=True)
        try:
            seconds, cr = clip_retrieval_run(folders[n], work / f"cr{n}", args.model, ckpt, args.batch, args.workers,
                                             args.cr_path)
            vectors[("cr", n)] = cr["vectors"]
            runs["clip_retrieval"][n] = {"whole_command_s": round(seconds, 2), "log_tail": cr["log_tail"]}
        except (RuntimeError, StopIteration) as e:
            runs["clip_retrieval"][n] = {"error": str(e)[-1500:]}
        print(f"clip-retrieval, {n} files: {runs['clip_retrieval'][n]}", flush=True)
    n = sizes[0]
    out = str(work / "plain.npy")
    seconds, _ = timed(me + ["--plain-run", str(folders[n]), out])
    runs["plain_loop_fp32"][n] = {"whole_command_s": round(seconds, 2)}
    plain = np.load(out)
    print(f"plain loop fp32, {n} files: {runs['plain_loop_fp32'][n]}", flush=True)
    results["runs"] = runs

    small, big = sizes[0], sizes[-1]
    summary = {"lakelens_core_marginal_images_per_s": marginal(
        (small, runs["lakelens_core"][small]["whole_command_s"]), (big, runs["lakelens_core"][big]["whole_command_s"]))}
    names = [p.name for p in all_paths[:small]]
    core = np.stack([vectors[("core", small)][k] for k in names])
    summary["lakelens_fp16_cosine_to_plain_fp32"] = cosine(core, plain)
    summary["plain_loop_fp32_images_per_s_whole"] = round(small / runs["plain_loop_fp32"][small]["whole_command_s"], 1)
    if all("whole_command_s" in runs["clip_retrieval"][k] for k in sizes):
        cr = runs["clip_retrieval"]
        summary["clip_retrieval_marginal_images_per_s"] = marginal((small, cr[small]["whole_command_s"]),
                                                                   (big, cr[big]["whole_command_s"]))
        summary["lakelens_over_clip_retrieval_marginal"] = round(
            summary["lakelens_core_marginal_images_per_s"] / summary["clip_retrieval_marginal_images_per_s"], 2)
        summary["lakelens_over_clip_retrieval_whole_time"] = {
            k: round(runs["lakelens_core"][k]["whole_command_s"] / cr[k]["whole_command_s"], 2) for k in sizes}
        summary["lakelens_cosine_to_clip_retrieval"] = cosine(core, np.stack([vectors[("cr", small)][k] for k in names]))
    results["summary"] = summary
    print(json.dumps(summary, indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
