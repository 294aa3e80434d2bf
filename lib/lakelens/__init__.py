"""lakelens: natural-language image search over a data lake.

The public API. Names load on first use (PEP 562), so `from lakelens import Searcher` never imports
pyspark, while `from lakelens import EmbedJob` brings Spark in."""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    # errors
    "LakelensError": "lakelens.errors", "ConfigError": "lakelens.errors", "DataError": "lakelens.errors",
    "IdCollisionError": "lakelens.errors", "IndexDirError": "lakelens.errors",
    "IndexMismatchError": "lakelens.errors", "QueryError": "lakelens.errors", "BusyError": "lakelens.errors",
    "ModelLoadError": "lakelens.errors", "SparkSetupError": "lakelens.errors", "FinetuneError": "lakelens.errors",
    # config, models, paths
    "Config": "lakelens.config", "load_config": "lakelens.config:load", "ModelSpec": "lakelens.models.registry",
    "path_id": "lakelens.ingest.paths", "to_stored": "lakelens.ingest.paths", "to_local": "lakelens.ingest.paths",
    # query driver and the embedder core
    "Searcher": "lakelens.search.searcher", "Embedder": "lakelens.ingest.embedder",
    "build_local": "lakelens.index.build", "Choice": "lakelens.index.factory",
    # captions: the core (no Spark) and its job
    "Captioner": "lakelens.tags.captions", "CaptionJob": "lakelens.tags.caption_job",
    # Spark jobs
    "EmbedJob": "lakelens.ingest.embed_job", "IndexJob": "lakelens.index.job", "get_session": "lakelens.spark",
    "TagJob": "lakelens.tags.job",
    # tag vocabularies (no Spark)
    "load_vocab": "lakelens.tags.vocab", "tag_vectors": "lakelens.tags.vocab",
    # training and evaluation
    "finetune": "lakelens.train.finetune", "evaluate_index": "lakelens.train.eval_run",
    "read_captions": "lakelens.train.eval_run",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'lakelens' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value
