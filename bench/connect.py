"""Benchmark: the embed job's marginal rate and the index job's wall time through Spark Connect against a
classic session, same images, same model and engine, in one run. Writes bench/results/connect.json.

Each mode runs in its own driver process (pyspark picks classic or Connect per process): classic is
`get_session` on local[2]; Connect is a session on a local Connect server (lakelens.connect_server: pyspark's
SparkConnectServer with Delta, local[2]) started once before the rounds. A round embeds the same folder into
a fresh table in several chunks and then indexes it; rounds alternate classic / Connect so a drift of the
machine's speed falls on both. The marginal rate is the files of chunks 2.. over their embed + commit
seconds (EmbedStats.chunk_seconds), so session and worker start-up are left out; the index time is
IndexJob.launch() in a session already open.

    .venv/bin/python bench/connect.py [--images 600] [--chunk 150] [--chunk-seconds 0] [--rounds 2]
        [--engine onnx-int8] [--model lakelens-tiny --pretrained none]

The model is random-init (no weights are downloaded): `--model ViT-B-32 --pretrained none` gives a real
model's per-image work, so the per-chunk cost of Connect is weighed against what a user's chunk costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import SMOKE_HELP, describe, smoke  # bench/ is on the path: this script's folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

DRIVER = r"""
import json, sys, time
from lakelens import EmbedJob, IndexJob, config
from lakelens.spark import get_session, is_connect
images, table, index, chunk, seconds, engine, model, pretrained = sys.argv[1:9]
conf = config.load(sys.argv[9], [f"embed.images={images}", f"embed.table={table}", f"embed.chunk_size={chunk}",
                                 f"embed.chunk_seconds={seconds}", f"embed.engine={engine}", f"model.name={model}",
                                 f"model.pretrained={pretrained}", f"index.table={table}", f"index.index={index}"])
spark, _ = get_session(conf)
t = time.perf_counter()
stats = EmbedJob(spark, conf, log=lambda *a: None).launch()
embed_s = time.perf_counter() - t
t = time.perf_counter()
result = IndexJob(spark, conf, log=lambda *a: None).launch()
index_s = time.perf_counter() - t
print(json.dumps({"connect": is_connect(spark), "embedded": stats.embedded, "chunk_seconds": stats.chunk_seconds,
                  "embed_s": embed_s, "index_s": index_s, "index_rows": result.rows}))
"""


def marginal_rate(chunk_seconds: list) -> float:
    later = chunk_seconds[1:]
    return sum(c[0] for c in later) / sum(c[1] + c[2] for c in later)


def make_images(folder: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from embed import make_images as photos

    photos(folder, n, 256, 256)


def run_round(mode: str, images: Path, work: Path, args, url: str) -> dict:
    env = {k: v for k, v in __import__("os").environ.items() if k != "SPARK_REMOTE"}
    if mode == "connect":
        env["SPARK_REMOTE"] = url
    tag = f"{mode}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-c", DRIVER, str(images), str(work / f"table-{tag}"), str(work / f"index-{tag}"),
           str(args.chunk), str(args.chunk_seconds), args.engine, args.model, args.pretrained,
           str(ROOT / "conf" / "local.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{mode} round failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["connect"] == (mode == "connect"), got
    got["marginal_images_per_s"] = round(marginal_rate(got["chunk_seconds"]), 2)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--chunk", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-seconds", type=float, default=0, help="embed.chunk_seconds (0: fixed chunks)")
    ap.add_argument("--engine", default="onnx-int8")
    ap.add_argument("--model", default="lakelens-tiny")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--out", default=str(RESULTS / "connect.json"))
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args()
    smoke(args, images=8, chunk=4, rounds=1)
    from lakelens.connect_server import ConnectServer

    machine = describe()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, flags {' '.join(machine['flags'])}")
    with tempfile.TemporaryDirectory(prefix="lakelens-bench-connect-") as tmp:
        work = Path(tmp)
        make_images(work / "images", args.images)
        server = ConnectServer.start(work / "connect-server.log")
        try:
            rounds = []
            for i in range(args.rounds):
                for mode in ("classic", "connect") if i % 2 == 0 else ("connect", "classic"):
                    r = run_round(mode, work / "images", work, args, server.url)
                    print(f"round {i + 1} {mode:8s}: marginal {r['marginal_images_per_s']:.1f} images/s, "
                          f"embed {r['embed_s']:.1f} s, index {r['index_s']:.1f} s")
                    rounds.append({"round": i + 1, "mode": mode, **r})
        finally:
            server.stop()
    by = {m: [r for r in rounds if r["mode"] == m] for m in ("classic", "connect")}
    med = lambda xs: sorted(xs)[len(xs) // 2] if len(xs) % 2 else sum(sorted(xs)[len(xs) // 2 - 1:len(xs) // 2 + 1]) / 2  # noqa: E731
    summary = {
        "marginal_connect_over_classic": round(med([r["marginal_images_per_s"] for r in by["connect"]])
                                               / med([r["marginal_images_per_s"] for r in by["classic"]]), 3),
        "index_seconds_connect_over_classic": round(med([r["index_s"] for r in by["connect"]])
                                                    / med([r["index_s"] for r in by["classic"]]), 3),
        "per_round_marginal_ratio": [round(c["marginal_images_per_s"] / k["marginal_images_per_s"], 3)
                                     for c, k in zip(by["connect"], by["classic"])],
    }
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "settings": vars(args), "rounds": rounds,
                                          "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
