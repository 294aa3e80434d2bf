"""clip-retrieval's API under load (`bench/serve.py --knn`): 20 client threads posting ClipClient's own body
to `lakelens serve`'s /knn-service, against its /api/search on the same index and text queries; and against
clip-retrieval's back end (`clip-retrieval back`, installed in bench/.venv-clipret) serving the same vectors for
the same embedding_input queries. clip_back gets the HNSW graph of lakelens's shard itself (its inner index,
whose positions are clip_back's ids) and a metadata Parquet of the same url / image_path / caption columns,
so both search the same graph with the same efSearch and answer the same fields. The workloads alternate in
rounds, so a change in machine load falls on all alike; one server works at a time."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from conftest import clustered
from machine import describe
from serve import MODEL_KEY, http_clients, start_server, stats

from lakelens import Searcher
from lakelens import index as ix
from lakelens.config import parse_size
from lakelens.train import synth

ROOT = Path(__file__).resolve().parents[1]
# python -m venv bench/.venv-clipret; bench/.venv-clipret/bin/pip install clip-retrieval==2.45.0 'setuptools<81'
# (its clip package imports pkg_resources, which setuptools 81 removed)
CLIPRET = ROOT / "bench" / ".venv-clipret"
# clip_back loads a CLIP model at start even when queries bring their own vectors; no model hub is reachable
# here, so ViT-B-32 gets random weights saved locally (all_clip's "open_clip:ARCH/CHECKPOINT"): the
# embedding_input queries never run it
RANDOM_VIT = "import open_clip, sys, torch; torch.save(open_clip.create_model('ViT-B-32').state_dict(), sys.argv[1])"
# ClipClient's body besides the query (clip_client.py, 2.45.0 defaults); num_images and num_result_ids are k
CLIENT_KEYS = {"deduplicate": True, "use_safety_model": True, "use_violence_detector": True, "use_mclip": False,
               "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image"}
# clip_back's switches for models it would download at start (none reachable here; none used by this body)
CLIP_BACK_FLAGS = ["--enable_mclip_option", "False", "--provide_aesthetic_embeddings", "False",
                   "--provide_safety_model", "False", "--provide_violence_detector", "False", "--use_jit", "False"]


def clip_back_folder(index_dir: Path, folder: Path) -> np.ndarray:
    """clip_back's index folder (image.index, metadata/) from lakelens's single shard: the ids of its positions."""
    import faiss
    import pandas as pd

    s = Searcher.open(index_dir)
    shards = s.manifest["shards"]
    assert len(shards) == 1, "one shard: clip_back serves one index per name"
    wrapped = faiss.read_index(str(index_dir / s.version / shards[0]["file"]))
    inner = faiss.downcast_index(wrapped.index)
    ids = faiss.vector_to_array(wrapped.id_map).astype(np.int64)
    ef = s.manifest.get("search_params", {}).get("efSearch")
    if ef and hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(ef)  # lakelens sets it per query; clip_back searches with what the file holds
    (folder / "metadata").mkdir(parents=True)
    faiss.write_index(inner, str(folder / "image.index"))
    paths = s.rows_of(ids)["path"].tolist()
    pd.DataFrame({"url": [f"http://127.0.0.1/thumb/{i}" for i in ids], "image_path": paths,
                  "caption": [""] * len(ids)}).to_parquet(folder / "metadata" / "0000.parquet")
    return ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_clip_back(folder: Path, log_path: Path):
    """(process, base URL) of `clip-retrieval back` on the folder, or (None, why it cannot run here)."""
    exe = CLIPRET / "bin" / "clip-retrieval"
    if not exe.is_file():
        return None, f"{exe} is missing (see bench/knn.py for its install)"
    weights = folder.parent / "vit-b-32-random.pt"
    made = subprocess.run([str(CLIPRET / "bin" / "python"), "-c", RANDOM_VIT, str(weights)], capture_output=True,
                          text=True, timeout=600)
    if made.returncode != 0:
        return None, f"no ViT-B-32 weights for clip_back: {made.stderr[-1500:]}"
    model = f"open_clip:ViT-B-32/{weights}"
    (folder.parent / "indices.json").write_text(json.dumps({"bench": str(folder)}))
    port = free_port()
    log = open(log_path, "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([str(exe), "back", "--port", str(port), "--indices_paths", str(folder.parent / "indices.json"),
                             "--clip_model", model, *CLIP_BACK_FLAGS], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=folder.parent)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            return None, f"clip-retrieval back exited ({proc.returncode}): {log_path.read_text()[-1500:]}"
        try:
            if requests.get(f"{base}/indices-list", timeout=5).json() == ["bench"]:
                return proc, base
        except (requests.RequestException, ValueError):
            time.sleep(0.5)
    proc.kill()
    return None, f"clip-retrieval back did not answer in 10 minutes: {log_path.read_text()[-1500:]}"


def knn_sender(base: str, key: str, k: int, **extra):
    def send(session, q):
        value = [float(x) for x in q] if key == "embedding_input" else q
        r = session.post(f"{base}/knn-service", data=json.dumps({key: value, "num_images": k, "num_result_ids": k,
                                                                 **CLIENT_KEYS, **extra}), timeout=120)
        ok = r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) > 0
        return None if ok else f"{r.status_code}: {r.text[:200]}"
    return send


def same_answers(lake: str, clip: str, vectors, ids: np.ndarray, k: int) -> float:
    """Share of the top-k ids both back ends give for the same vectors (deduplication off): the same graph."""
    found = []
    for v in vectors:
        body = {"embedding_input": [float(x) for x in v], "num_images": k, **CLIENT_KEYS, "deduplicate": False}
        a = [r["id"] for r in requests.post(f"{lake}/knn-service", data=json.dumps(body), timeout=60).json()]
        b = [int(ids[r["id"]]) for r in requests.post(f"{clip}/knn-service", data=json.dumps(
            {**body, "indice_name": "bench"}), timeout=60).json()]
        found.append(len(set(a) & set(b)) / k)
    return round(float(np.mean(found)), 4)


def knn_main(args, out: Path) -> int:
    machine = describe()
    print(f"[bench] machine: {machine['cpu']}, {machine['cores']} cores", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lakelens-knn-"))
    procs = []
    try:
        x = clustered(args.rows, 128, clusters=500, noise=0.4, seed=0)
        ids = np.arange(args.rows, dtype=np.int64) * 7919 - 10**12
        paths = [f"file:/lake/photos/{i // 1000:04d}/img{i:07d}.jpg" for i in range(args.rows)]
        choice = ix.choose_factory(args.rows, 128, parse_size("4G"))
        ix.build_local(work / "index", ids, x, paths, choice, model_key=MODEL_KEY)
        texts = [s.caption for s in synth.samples(args.clients * args.requests, seed=3)]
        searcher = Searcher.open(work / "index")
        vectors = [searcher.embed_text(t)[0] for t in texts]  # the same queries, as clients that embed them
        positions = clip_back_folder(work / "index", work / "clip" / "bench")
        proc, base = start_server(work / "index", args.threads, work / "server.log")
        procs.append(proc)
        clip, clip_base = start_clip_back(work / "clip" / "bench", work / "clip-back.log")
        if clip is None:
            print(f"[bench] clip-retrieval back: not run: {clip_base}", flush=True)
        else:
            procs.append(clip)
        loads = {"api_search_text": (base, texts, None),
                 "knn_text": (base, texts, knn_sender(base, "text", args.k)),
                 "knn_embedding": (base, vectors, knn_sender(base, "embedding_input", args.k))}
        if clip is not None:
            loads["clip_back_embedding"] = (clip_base, vectors,
                                            knn_sender(clip_base, "embedding_input", args.k, indice_name="bench"))
        for name, (url, qs, send) in loads.items():  # warm-up: models built, pages mapped, connections open
            http_clients(url, qs[:20], 1, 20, args.k, send)
        overlap = same_answers(base, clip_base, vectors[:50], positions, args.k) if clip is not None else None
        per = max(1, args.requests // args.rounds)
        acc = {name: {"times": [], "wall": 0.0, "errors": 0, "samples": []} for name in loads}
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name, (url, qs, send) in loads.items():
                block = qs[r * args.clients * per:] + qs[:r * args.clients * per]
                one = http_clients(url, block, args.clients, per, args.k, send)
                a = acc[name]
                a["times"] += one["times"]
                a["wall"] += one["wall_s"]
                a["errors"] += one["errors"]
                a["samples"] += one["error_samples"]
                print(f"[bench] round {r + 1} {name}: {one['req_per_s']} req/s, p50 {one['p50_ms']} ms", flush=True)
        load.append(os.getloadavg()[0])
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)

    runs = {name: {**stats(a["times"]), "req_per_s": round(len(a["times"]) / a["wall"], 1), "errors": a["errors"],
                   "error_samples": a["samples"][:5]} for name, a in acc.items()}
    ratios = {"knn_text_vs_api_search_req_per_s": round(runs["knn_text"]["req_per_s"]
                                                        / runs["api_search_text"]["req_per_s"], 2)}
    if "clip_back_embedding" in runs:
        ratios["knn_embedding_vs_clip_back_req_per_s"] = round(runs["knn_embedding"]["req_per_s"]
                                                               / runs["clip_back_embedding"]["req_per_s"], 2)
        ratios["clip_back_vs_knn_embedding_p50"] = round(runs["clip_back_embedding"]["p50_ms"]
                                                         / runs["knn_embedding"]["p50_ms"], 2)
    results = {
        "what": f"{args.clients} client threads on loopback, {args.rounds} alternating rounds of {per} requests each "
                f"per workload: /api/search?q=<caption>&k={args.k}; /knn-service with ClipClient's body "
                f"(num_images = num_result_ids = {args.k}, deduplicate true) and a caption (embedded by the server "
                f"with {MODEL_KEY}) or that caption's vector (embedding_input); clip-retrieval back on the same "
                f"vectors and graph for the same embedding_input bodies. Index: {args.rows} x 128 clustered unit "
                f"vectors, {choice.factory} (auto), one shard. lakelens serve: waitress, {args.threads} threads; "
                "clip_back: Flask's threaded server, Parquet metadata (its defaults).",
        "machine": machine, "load_average_1min_start_end": [round(v, 2) for v in load], "date": time.strftime("%Y-%m-%d"),
        "clip_back": {"ran": clip is not None, **({"why_not": clip_base} if clip is None else
                                                  {"version": "2.45.0", "clip_model": "ViT-B-32 (random weights, unused)",
                                                   "top_k_overlap_with_lakelens": overlap})},
        "runs": runs, "ratios": ratios,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))
    return 0 if all(r["errors"] == 0 for r in runs.values()) else 1
