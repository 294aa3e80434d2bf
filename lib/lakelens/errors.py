"""One error base for every expected failure: the CLI catches LakelensError alone and prints one line.

Anything else that escapes is a bug and keeps its traceback."""

from __future__ import annotations


class LakelensError(Exception):
    """Base of every failure lakelens expects and can explain in one line."""


class ConfigError(LakelensError, ValueError):
    """A config key is unknown, has the wrong type, or a value outside its allowed set; the message names the key."""


class SparkSetupError(LakelensError, RuntimeError):
    """The Spark session cannot do what lakelens needs (Delta missing from the classpath)."""


class ModelLoadError(LakelensError, RuntimeError):
    """The model's weights could not be loaded (missing file, no hub access, incompatible checkpoint)."""


class DataError(LakelensError, ValueError):
    """Input data is unusable as a whole: a table lacks columns, a source is missing, ids collide."""


class IdCollisionError(DataError):
    """Two different paths hash to the same 64-bit id; the run stops before writing either."""


class IndexDirError(LakelensError, RuntimeError):
    """An index directory is missing, incomplete or inconsistent."""


class IndexMismatchError(IndexDirError, ValueError):
    """The index was built with another model (or other weights) than the caller's."""


class QueryError(LakelensError, ValueError):
    """The query itself is unusable: empty text, unreadable image, k out of range, wrong vector shape."""


class BusyError(LakelensError, RuntimeError):
    """Another run holds the lock on the same table or index folder."""


class FinetuneError(LakelensError, ValueError):
    """Fine-tuning cannot start: too few pairs, a resume folder of other settings, ..."""
