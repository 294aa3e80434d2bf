"""`lakelens refresh`: embed new and changed images, then bring the index up to date, in one Spark
session, for cron and Airflow. One JSON line at the end; exit 0 when done or nothing changed. With a
vocabulary (tag.vocab) and a tags table (index.tags or tag.tags), the new and changed images are tagged
between the two, and the index's keyword side follows.

A refresh holds a lock of its own (per index folder), so a second scheduled run while one is still
going exits at once with a clear message instead of queueing behind it."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from lakelens.errors import ConfigError
from lakelens.index.job import IndexJob
from lakelens.ingest.embed_job import EmbedJob
from lakelens.ingest.paths import to_stored
from lakelens.locks import RunLock, lock_dir
from lakelens.spark import Job
from lakelens.tags.job import TagJob


@dataclass
class RefreshResult:
    embed: dict = field(default_factory=dict)
    tag: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def line(self) -> str:
        e, i = self.embed, self.index
        return json.dumps({
            "status": "ok", "changed": bool(e.get("embedded") or e.get("failed") or e.get("deleted") or i.get("built")),
            "embed": {k: e.get(k) for k in ("new", "changed", "deleted", "unchanged", "embedded", "failed")},
            "table_version": e.get("table_version"),
            "tag": {k: self.tag.get(k) for k in ("mode", "scored", "removed", "tag_rows", "tags")} if self.tag else None,
            "index": {k: i.get(k) for k in ("version", "built", "build", "build_reason", "rows", "factory", "deltas",
                                             "tombstones")},
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        })


def refresh_lock(index: str) -> RunLock:
    digest = hashlib.sha256(to_stored(index).encode()).hexdigest()[:24]
    return RunLock(lock_dir() / f"refresh-{digest}.lock", f"refresh of index {index}")


class RefreshJob(Job):
    """`RefreshJob(spark=None, conf=None).launch()` -> RefreshResult: the embed job, then the index job
    on the table version it produced, in this job's Spark session."""

    def __init__(self, spark=None, conf=None, log=print):
        super().__init__(spark, conf)
        self.log = log

    def run(self) -> RefreshResult:
        c = self.conf
        for key, value in (("embed.images", c.embed.images), ("embed.table", c.embed.table),
                           ("index.index", c.index.index)):
            if not value:
                raise ConfigError(f"{key}: required for refresh (--images, --table, --index)")
        c.index.table, c.index.format = c.embed.table, c.embed.format
        tagging = bool(c.tag.vocab)
        if tagging:
            c.tag.tags = c.tag.tags or c.index.tags
            if not c.tag.tags:
                raise ConfigError("tag.tags: required for refresh with tag.vocab (or index.tags): the tags table")
            c.tag.table, c.tag.format, c.index.tags = c.embed.table, c.embed.format, c.tag.tags
            c.index.vocab = c.index.vocab or c.tag.vocab
        result = RefreshResult()
        with refresh_lock(c.index.index):
            t0 = time.time()
            stats = EmbedJob(spark=self.spark, conf=c, log=self.log).launch()
            result.embed, result.seconds["embed"] = stats.to_dict(), time.time() - t0
            if tagging:
                t0 = time.time()
                result.tag, result.seconds["tag"] = TagJob(spark=self.spark, conf=c, log=self.log).launch().to_dict(), \
                    time.time() - t0
            t0 = time.time()
            built = IndexJob(spark=self.spark, conf=c, log=self.log).launch()
            result.index, result.seconds["index"] = built.to_dict(), time.time() - t0
        result.seconds["total"] = sum(result.seconds.values())
        return result
