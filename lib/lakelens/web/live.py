"""The live searcher behind the server: follows INDEX/CURRENT so a newly published version is served without restart."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from lakelens.index.layout import CURRENT
from lakelens.search import Searcher

log = logging.getLogger(__name__)


class LiveSearcher:
    """Holds one Searcher; `get()` reloads it when CURRENT has been replaced since the last look.

    publish() swaps CURRENT with an atomic rename, so a new version always shows as a new inode;
    one stat() per request (microseconds) is cheaper than a timer thread and has no stale window."""

    def __init__(self, index_dir: str | Path, searcher: Searcher | None = None, **searcher_options):
        self.index_dir = Path(index_dir)
        self._lock = threading.Lock()
        self._stamp = self._current_stamp()
        self.searcher = searcher or Searcher.open(self.index_dir, **searcher_options)
        self.last_error: str | None = None

    def _current_stamp(self):
        try:
            st = os.stat(self.index_dir / CURRENT)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def get(self) -> Searcher:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:  # another request may have reloaded while this one waited
                    self._reload(stamp)
        return self.searcher

    def _reload(self, stamp) -> None:
        try:
            if self.searcher.reload():
                log.info("serving index version %s", self.searcher.version)
            self.last_error = None
        except Exception as e:  # a broken new version must not take the server down: keep the old one
            # clients see that it failed; the reason (paths, library text) goes only to the server's log
            self.last_error = "could not load the new index version (see the server log)"
            log.error("could not load the new index version: %s; still serving %s", e, self.searcher.version)
        self._stamp = stamp  # also after a failure, so a broken version is not retried on every request

    def warm(self) -> None:
        """Build the text/image model now, so the first user does not wait for it."""
        self.searcher.embed_text("warm up")
