"""While the app runs, every log record goes to the log pane and a log file, never the
terminal: a line written to stderr would be drawn over the screen (huggingface_hub, uvicorn
and httpx each bring a handler of their own that writes there)."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.message import Message

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_BYTES = 5_000_000  # per file; one backup is kept


@dataclass(frozen=True)
class LogEntry:
    """One log record as the pane shows it."""

    at: float
    level: str  # DEBUG, INFO, WARNING, ERROR, CRITICAL
    levelno: int
    name: str
    text: str  # the formatted line


class LogPosted(Message):
    """A log record (posted from any thread)."""

    def __init__(self, entry: LogEntry) -> None:
        super().__init__()
        self.entry = entry


class PostingHandler(logging.Handler):
    """Turns records into LogPosted messages for the app; until the app attaches, keeps the
    last EARLY records (what happened while it started) to post then."""

    EARLY = 200

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
        self._post: Callable[[Message], object] | None = None
        self._early: deque[LogEntry] = deque(maxlen=self.EARLY)

    def attach(self, post: Callable[[Message], object] | None) -> None:
        """Start posting to `post` (None: buffer again), early records first."""
        with self.lock or contextlib.nullcontext():
            self._post = post
            early, self._early = list(self._early), deque(maxlen=self.EARLY)
        if post is not None:
            for entry in early:
                post(LogPosted(entry))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = LogEntry(
                record.created, record.levelname, record.levelno, record.name, self.format(record)
            )
            if self._post is None:
                self._early.append(entry)
            else:
                self._post(LogPosted(entry))
        except Exception:
            self.handleError(record)


class LogRouting:
    """Makes the pane's and the file's handlers the only ones: every other handler on every
    logger is taken away (libraries bring their own that write to the terminal: a StreamHandler,
    or Litestar's queue handler) and its records propagate to the root. `close()` restores."""

    def __init__(self, handler: logging.Handler, log_file: Path | None) -> None:
        self.handler = handler
        self.log_file = log_file
        self._removed: list[tuple[logging.Logger, logging.Handler]] = []
        self._propagate: list[logging.Logger] = []
        self._file: logging.Handler | None = None
        self._root_level = logging.root.level
        self._last_resort = logging.lastResort
        self._open = False

    def sweep(self) -> None:
        """Take every handler but ours (again: a library may have configured logging since)."""
        ours = (self.handler, self._file)
        loggers: list[logging.Logger] = [logging.root]
        loggers += [
            obj
            for obj in logging.root.manager.loggerDict.values()
            if isinstance(obj, logging.Logger)
        ]
        for lg in loggers:
            for h in list(lg.handlers):
                if h not in ours and not isinstance(h, logging.NullHandler):
                    lg.removeHandler(h)
                    self._removed.append((lg, h))
            if lg is not logging.root and not lg.propagate:
                lg.propagate = True
                self._propagate.append(lg)
        for h in ours:
            if h is not None and h not in logging.root.handlers:
                logging.root.addHandler(h)
        if logging.root.level > logging.INFO or logging.root.level == logging.NOTSET:
            logging.root.setLevel(logging.INFO)

    def open(self) -> LogRouting:
        # huggingface_hub adds its terminal handler the first time its logging is used: use it
        # now, so that the sweep takes the handler and it never comes back.
        with contextlib.suppress(ImportError):
            from huggingface_hub.utils import logging as hf_logging

            hf_logging.get_logger()
        if self.log_file is not None:
            with contextlib.suppress(OSError):
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                fh = logging.handlers.RotatingFileHandler(
                    self.log_file, maxBytes=LOG_BYTES, backupCount=1, encoding="utf-8"
                )
                fh.setFormatter(logging.Formatter(LOG_FORMAT))
                fh.setLevel(logging.INFO)
                logging.root.addHandler(fh)
                self._file = fh
        self.sweep()
        logging.lastResort = None  # a record nobody handles is dropped, not printed
        logging.captureWarnings(True)  # warnings.warn(...) becomes a record too
        self._open = True
        return self

    def close(self) -> None:
        logging.root.removeHandler(self.handler)
        if self._file is not None:
            logging.root.removeHandler(self._file)
            self._file.close()
        for lg, h in self._removed:
            lg.addHandler(h)
        self._removed.clear()
        for lg in self._propagate:
            lg.propagate = False
        self._propagate.clear()
        logging.root.setLevel(self._root_level)
        logging.lastResort = self._last_resort
        if self._open:
            self._open = False
            logging.captureWarnings(False)

    def __enter__(self) -> LogRouting:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()
