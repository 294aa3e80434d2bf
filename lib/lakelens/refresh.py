"""`lakelens refresh`: embed new and changed images, then bring the index up to date, in one Spark
session, for cron and Airflow. One JSON line at the end; exit 0 when done or nothing changed.

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


@dataclass
class RefreshResult:
    embed: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def line(self) -> str:
        e, i = self.embed, self.index
        return json.dumps({
            "status": "ok", "changed": bool(e.get("embedded") or e.get("failed") or e.get("deleted") or i.get("built")),
            "embed": {k: e.get(k) for k in ("new", "changed", "deleted", "unchanged", "embedded", "failed")},
            "table_version": e.get("table_version"),
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
        result = RefreshResult()
        with refresh_lock(c.index.index):
            t0 = time.time()
            stats = EmbedJob(spark=self.spark, conf=c, log=self.log).launch()
            result.embed, result.seconds["embed"] = stats.to_dict(), time.time() - t0
            t0 = time.time()
            built = IndexJob(spark=self.spark, conf=c, log=self.log).launch()
            result.index, result.seconds["index"] = built.to_dict(), time.time() - t0
        result.seconds["total"] = result.seconds["embed"] + result.seconds["index"]
        return result
