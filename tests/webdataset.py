"""WebDataset shards laid out as img2dataset writes them: NNNNN.tar holding KEY.jpg, KEY.txt (the caption)
and KEY.json per sample, with NNNNN.parquet (the samples' metadata, no bytes) and NNNNN_stats.json beside it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import encode, noise_image


def sample_image(seed: int, fmt: str = "JPEG") -> bytes:
    return encode(noise_image(seed, size=(64 + seed % 5 * 6, 48 + seed % 3 * 8)), fmt)


def write_shard(folder: Path, shard: int, keys: list[int], captions: dict | None = None, images: dict | None = None,
                extra: dict | None = None) -> Path:
    """Shard `shard` of `folder` with one sample per key (img2dataset's keys: shard number and index, 9
    digits): KEY.jpg (noise, or images[key]), KEY.txt (captions[key], default 'a photo number KEY'), KEY.json;
    extra[key]: more members {extension: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{shard:05d}.tar"
    meta = []
    with tarfile.open(path, "w") as tar:
        for k in keys:
            key = f"{k:09d}"
            caption = (captions or {}).get(k, f"a photo number {k}")
            members = {"jpg": (images or {}).get(k, sample_image(k)), "txt": caption.encode(),
                       "json": json.dumps({"key": key, "caption": caption, "status": "success"}).encode(),
                       **(extra or {}).get(k, {})}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
            meta.append({"key": key, "caption": caption, "status": "success", "url": f"http://example/{key}.jpg"})
    pq.write_table(pa.Table.from_pylist(meta), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(keys), "successes": len(keys)}))
    return path


def member_bytes(shard: Path, name: str) -> bytes:
    """A member's bytes, read forward (a truncated shard still gives the members before the cut)."""
    with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if info.name == name:
                return tar.extractfile(info).read()
    raise KeyError(name)
