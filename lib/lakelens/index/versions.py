"""Index versions on disk: CURRENT, vNNNN/manifest.json, staging folders, atomic publish, prune, the folder lock."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from lakelens.errors import ConfigError, IndexDirError
from lakelens.files import write_text
from lakelens.index.layout import CURRENT, LOCK, MANIFEST, STAGING_PREFIX, VERSION_RE, version_name
from lakelens.locks import RunLock


def versions(index_dir: str | Path) -> list[str]:
    d = Path(index_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if VERSION_RE.match(p.name) and (p / MANIFEST).is_file()),
                  key=lambda n: int(n[1:]))


def current_version(index_dir: str | Path) -> str | None:
    f = Path(index_dir) / CURRENT
    if not f.is_file():
        return None
    name = f.read_text().strip()
    return name or None


def read_manifest(index_dir: str | Path, version: str | None = None) -> dict:
    version = version or current_version(index_dir)
    if version is None:
        raise IndexDirError(f"no published index in {index_dir} (no {CURRENT} file)")
    path = Path(index_dir) / version / MANIFEST
    if not path.is_file():
        raise IndexDirError(f"{index_dir}: {CURRENT} names {version}, which has no {MANIFEST}")
    return json.loads(path.read_text())


def index_lock(index_dir: str | Path, wait: float = 0.0) -> RunLock:
    """The folder's run lock: one build (and prune) at a time; readers never take it."""
    return RunLock(Path(index_dir) / LOCK, f"index folder {index_dir}", wait)


def staging_dir(index_dir: str | Path) -> Path:
    """A fresh hidden folder inside the index dir where a version is written before it is published."""
    d = Path(index_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(index_dir: str | Path, staged: Path, manifest: dict) -> str:
    """Write the manifest, move the staged folder to the next vNNNN name, then switch CURRENT with an
    atomic rename: readers see either the old version or the complete new one. rename() onto a
    folder that exists fails, so two publishers can never take the same number: the loser tries the next."""
    d = Path(index_dir)
    existing = [int(p.name[1:]) for p in d.iterdir() if VERSION_RE.match(p.name)]
    number = max(existing) + 1 if existing else 1
    for _ in range(1000):
        name = version_name(number)
        (staged / MANIFEST).write_text(json.dumps({**manifest, "version": name, "published_at": time.time()},
                                                  indent=2) + "\n")
        for f in staged.rglob("*"):  # the keyword index is a folder of its own
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        try:
            os.rename(staged, d / name)
            break
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            number += 1
    else:
        raise IndexDirError(f"{index_dir}: no free version number after {version_name(number)}")
    write_text(d / CURRENT, name + "\n")
    return name


def prune(index_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest versions; never the live one. Returns the removed names.
    Takes the folder lock, so it never runs beside a build; staging folders left by crashed builds
    are removed too (a build holds the lock while its staging folder exists)."""
    if keep < 1:
        raise ConfigError(f"index.prune: keeps at least 1 version, got {keep}")
    with index_lock(index_dir):
        return prune_locked(index_dir, keep)


def prune_locked(index_dir: str | Path, keep: int) -> list[str]:
    """prune() for a caller that holds the folder lock already."""
    live = current_version(index_dir)
    names = versions(index_dir)
    doomed = [v for v in names[:-keep] if v != live]
    for v in doomed:
        shutil.rmtree(Path(index_dir) / v, ignore_errors=True)
    for stale in Path(index_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return doomed
