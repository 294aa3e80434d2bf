"""Small tables that users hand lakelens beside the images (captions, labels, queries): where they are and
how they are read."""

from __future__ import annotations

from lakelens.ingest.paths import to_local, to_stored


def is_delta_path(path: str) -> bool:
    """A local folder with a _delta_log, or a remote URI (s3a://, abfss://, ...) that names no CSV or
    Parquet file: only Spark reads those."""
    if "://" in path and not path.startswith("file:"):
        return not path.lower().endswith((".csv", ".parquet"))
    return (to_local(to_stored(path)) / "_delta_log").is_dir()
