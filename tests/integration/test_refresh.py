"""`scripts/refresh.sh`, the exact command of the cron line and the Airflow DAG (docs/scheduling.md):
its JSON line, exit codes and lock, run as a scheduler runs it (a fresh process); the runs after the first
go through the same command in this process (`lakelens refresh` on the shared session), one JVM less each."""

from __future__ import annotations

import json
import os
import subprocess

from conftest import ROOT, write_images

from lakelens.cli import main
from lakelens.refresh import refresh_lock

SCRIPT = ROOT / "scripts" / "refresh.sh"


def run(tmp_path, *args, timeout=600):
    env = {**os.environ, "LAKELENS_LOCK_DIR": str(tmp_path / "locks")}
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def in_process(capsys, img, table, index, *flags) -> dict:
    """What the script runs, `lakelens refresh --conf ... --images --table --index ...`, in this process."""
    assert main(["refresh", "--conf", str(ROOT / "conf" / "local.yaml"), "--images", str(img), "--table", str(table),
                 "--index", str(index), *map(str, flags)]) == 0
    return last_json(capsys.readouterr().out)


def test_refresh_script_json_line_exit_codes_and_lock(spark, tmp_path, monkeypatch, capsys):
    img, table, index = tmp_path / "img", tmp_path / "table", tmp_path / "index"
    write_images(img, 6)
    first = run(tmp_path, img, table, index)
    assert first.returncode == 0, first.stderr[-3000:]
    line = last_json(first.stdout)
    assert line["status"] == "ok" and line["changed"] is True
    assert line["embed"]["embedded"] == 6 and line["index"]["build"] == "full" and line["index"]["rows"] == 6
    assert set(line["seconds"]) == {"embed", "index", "total"} and line["table_version"] >= 1

    monkeypatch.setenv("LAKELENS_LOCK_DIR", str(tmp_path / "locks"))
    again = in_process(capsys, img, table, index)
    assert again["changed"] is False and again["index"]["build"] == "none"

    write_images(img, 1, seed=5, start=100)
    # with a vocabulary, the refresh tags between embedding and indexing and the version gets a keyword index
    tags = tmp_path / "tags"
    third = in_process(capsys, img, table, index, "--vocab", "shapes", "--tags", tags, "--set", "tag.threshold=-1",
                       "--set", "tag.max_tags=2")
    assert third["embed"]["embedded"] == 1 and third["index"]["build"] == "incremental"
    assert third["index"]["rows"] == 7 and third["index"]["version"] == "v0002"
    assert third["tag"]["scored"] == 7 and third["tag"]["tag_rows"] == 14 and "tag" in third["seconds"]
    manifest = json.loads((index / "v0002" / "manifest.json").read_text())
    assert manifest["keywords"]["documents"] == 7 and manifest["keywords"]["tag_rows"] >= 14

    # a second scheduled run while one is running exits at once, non-zero, with one clear line
    with refresh_lock(str(index)):
        busy = run(tmp_path, img, table, index)
    assert busy.returncode == 2 and "is in use by pid" in busy.stderr and "Traceback" not in busy.stderr
    # one line and nothing else: the lock is taken before any Spark session starts
    assert busy.stdout == "" and busy.stderr.strip().startswith("lakelens refresh: error:")
    assert len(busy.stderr.strip().splitlines()) == 1

    # a failure is non-zero too
    bad = run(tmp_path, img, table, "")
    assert bad.returncode == 2 and "index.index: required" in bad.stderr
    usage = subprocess.run([str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
