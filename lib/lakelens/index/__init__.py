"""FAISS indexes: factory choice, shards, versions on disk and the one assembly path (no Spark here;
the Spark index job is lakelens.index.job)."""

from lakelens.errors import IndexDirError
from lakelens.index.build import TUNING_QUERIES, assemble, build_local, make_manifest, write_shard
from lakelens.index.factory import Choice, choose_factory, explicit_choice, new_index, nlist_for, train, training_rows
from lakelens.index.layout import CURRENT, MANIFEST
from lakelens.index.shards import (
                                   build_shard,
                                   load_shard,
                                   reconstruct,
                                   rerank_files,
                                   search_shards,
                                   shard_of,
                                   tune_nprobe,
)
from lakelens.index.versions import (
                                   current_version,
                                   index_lock,
                                   prune,
                                   publish,
                                   read_manifest,
                                   staging_dir,
                                   versions,
)

__all__ = ["CURRENT", "MANIFEST", "TUNING_QUERIES", "Choice", "IndexDirError", "assemble", "build_local",
           "build_shard", "choose_factory", "current_version", "explicit_choice", "index_lock", "load_shard",
           "make_manifest", "new_index", "nlist_for", "prune", "publish", "read_manifest", "reconstruct",
           "rerank_files", "search_shards", "shard_of", "staging_dir", "train", "training_rows", "tune_nprobe",
           "versions", "write_shard"]
