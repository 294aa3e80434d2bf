"""The query driver: Searcher over the live version of an index folder (never imports pyspark)."""

from lakelens.errors import IndexMismatchError, QueryError
from lakelens.search.results import MAX_K, RESULT_COLUMNS
from lakelens.search.searcher import Searcher

__all__ = ["MAX_K", "RESULT_COLUMNS", "IndexMismatchError", "QueryError", "Searcher"]
