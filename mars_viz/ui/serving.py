"""What a shared server keeps, and its bounds: the model work in flight per browser session (`Runs`: a Stop button or a
closed tab ends it), what the model is doing now (shown to the pages that wait for it), one temporary folder per
browser session (`SessionFiles`), the server's limits (`ServerLimits`), and a health report (`health`).

A browser session is Gradio's `session_hash`: one per open page (and one per `gradio_client.Client`). Closing the page
ends it (`Blocks.unload`), and with it its runs, its files and its per-page results.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Runs", "ServerLimits", "SessionFiles", "forget_session", "health", "rss_mb"]

log = logging.getLogger("mars_viz")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of a shared server (`--max-new-tokens-limit`, `--session-ttl`)."""

    max_new_tokens: int = 512  # the most tokens one answer may ask for (Explore's slider, /analyze, /explore)
    session_ttl_s: float = 7200.0  # a page's results and files are dropped this long after their last update

    def check_new_tokens(self, n) -> int:
        """`n` as an int, or ValueError (shown as the request's error) past the server's limit."""
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise ValueError(f"max_new_tokens must be a whole number, got {n!r}") from None
        if n < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {n}")
        if n > self.max_new_tokens:
            raise ValueError(f"max_new_tokens={n} is above this server's limit of {self.max_new_tokens} tokens per "
                             "answer (one request may not hold the shared model for minutes): ask for fewer, or "
                             "start the server with a higher --max-new-tokens-limit")
        return n


class Runs:
    """The model work in flight, by browser session: each run has an event that ends it (`cancel`), and the one that
    holds the model says what it is doing (`activity`) for the pages that wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[int, tuple[str | None, threading.Event]] = {}
        self._ids = itertools.count()
        self.activity = ""  # what the model is doing now, in words ("" when idle)
        self.holder: str | None = None  # the browser session whose work holds the model now

    @contextlib.contextmanager
    def run(self, key: str | None) -> Iterator[threading.Event]:
        """Register one run of browser session `key` (None: not cancellable from a page) for its lifetime."""
        event, rid = threading.Event(), next(self._ids)
        with self._lock:
            self._events[rid] = (key, event)
        try:
            yield event
        finally:
            with self._lock:
                del self._events[rid]

    def cancel(self, key: str | None) -> int:
        """End every run of browser session `key` at its next step; returns how many there were."""
        if key is None:
            return 0
        with self._lock:
            events = [e for k, e in self._events.values() if k == key]
        for e in events:
            e.set()
        return len(events)

    def count(self) -> int:
        with self._lock:
            return len(self._events)

    def say(self, text: str) -> None:
        self.activity = text

    def hold(self, key: str | None, what: str) -> None:
        """Browser session `key` holds the model now, doing `what`."""
        self.holder, self.activity = key, what

    def release(self) -> None:
        self.holder, self.activity = None, ""


_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class SessionFiles:
    """One temporary folder per browser session under one root: exports, reports and saved states are written there,
    never under a name the client chose. A folder goes when its session ends (`remove`), or `ttl_s` after its last
    write (`sweep`, for a page that vanished without saying so)."""

    def __init__(self, root: str | os.PathLike | None = None, ttl_s: float = 7200.0):
        self._root = Path(root) if root else None
        self.ttl_s = ttl_s
        self._swept = 0.0
        self.upload_dir: Path | None = None  # Gradio's upload folder (`create_app` sets it): its leftovers expire too

    @property
    def root(self) -> Path:
        """The folder (made on first use; without `root`, a fresh temporary one, removed when the process exits)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="mars_viz_server_"))
            atexit.register(shutil.rmtree, self._root, True)
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def folder(self, key: str | None) -> Path:
        """A fresh folder for one output of browser session `key` (a client's session hash, sanitised)."""
        base = self._session_dir(key)
        self.sweep_now_and_then()
        base.mkdir(parents=True, exist_ok=True)
        os.utime(base)  # its last write, for `sweep`
        return Path(tempfile.mkdtemp(dir=base))

    def _session_dir(self, key: str | None) -> Path:
        """The folder of browser session `key`, named by the key sanitised (a client's key never escapes the root)."""
        return self.root / "sessions" / (_SAFE.sub("_", key or "anonymous")[:64] or "anonymous")

    def remove(self, key: str | None) -> None:
        shutil.rmtree(self._session_dir(key), ignore_errors=True)

    def sweep(self, now: float | None = None) -> int:
        """Remove session folders last written more than `ttl_s` ago (and Gradio's upload leftovers as old); returns
        how many session folders went."""
        now = time.time() if now is None else now
        gone = 0
        for d in (self.root / "sessions").glob("*") if (self.root / "sessions").exists() else ():
            with contextlib.suppress(OSError):
                if now - d.stat().st_mtime > self.ttl_s:
                    shutil.rmtree(d, ignore_errors=True)
                    gone += 1
        # Gradio's multipart parser leaves one empty `tmpXXXXXXXX` per upload at the top of its upload folder (the
        # upload itself moves to a hashed sub-folder, which `delete_cache` ages out): those go after the TTL too
        for f in self.upload_dir.glob("tmp*") if self.upload_dir is not None and self.upload_dir.exists() else ():
            with contextlib.suppress(OSError):
                if f.is_file() and now - f.stat().st_mtime > self.ttl_s:
                    f.unlink()
        return gone

    def sweep_now_and_then(self, every_s: float = 5.0) -> None:
        """`sweep`, at most once per `every_s` (called on each new folder, each health report and each page's poll,
        so folders of pages that vanished go without a thread of their own)."""
        if time.monotonic() - self._swept >= every_s:
            self._swept = time.monotonic()
            self.sweep()

    def files(self) -> list[Path]:
        """Every file under the root (the sessions' and Gradio's cache, when it lives here)."""
        return [p for p in self.root.rglob("*") if p.is_file()]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def rss_mb() -> float:
    """This process's resident memory, in MB (Linux: /proc; elsewhere the peak, from `resource`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _hooks(model) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


def _live_states(demo) -> dict | None:
    """The browser sessions Gradio keeps for the app `demo`, and their per-page values (None: not launched)."""
    holder = getattr(demo, "state_holder", None)
    if holder is None:
        return None
    sessions = list(holder.session_data.values())
    return {"sessions": len(sessions), "values": sum(len(s.state_data) for s in sessions)}


def forget_session(demo, key: str | None) -> None:
    """Drop what Gradio keeps for browser session `key` of app `demo` now (its per-page values, through their
    `delete_callback`s, and its copy of the page's config), not an hour after the tab closed."""
    holder = getattr(demo, "state_holder", None)
    if holder is None or key is None:
        return
    holder.delete_state(key)
    with holder.lock:
        holder.session_data.pop(key, None)
        holder.time_last_used.pop(key, None)


def health(session, demo=None) -> dict:
    """What the server holds now: memory, threads, hooks on the model, the lock, runs in flight, temporary files.
    A soak reads it to see that nothing grows or is left behind (`bench/soak.py`)."""
    bb = session.backbone
    session.files.sweep_now_and_then()
    files = session.files.files()
    sessions = session.files.root / "sessions"
    threads = threading.enumerate()
    return {"rss_mb": round(rss_mb(), 1), "threads": sorted(t.name for t in threads),
            "pair_threads": sum(t.name == "mars_viz-pair" for t in threads),
            "hooks": None if bb is None else _hooks(bb.model), "lock_held": session.lock.locked(),
            "runs": session.runs.count(), "activity": session.runs.activity, "gradio": _live_states(demo),
            "tmp_root": str(session.files.root), "tmp_files": len(files),
            "session_folders": len(list(sessions.glob("*"))) if sessions.exists() else 0}
