"""The calm console: per stage a header, one live line, the stage's own summary; Ray's chatter in a log file.

While a stage runs, `sys.stdout`/`sys.stderr` are routers: what the main thread prints (headers,
summaries, the stage's one-line messages) reaches the terminal and the log; what other threads print
(Ray's log monitor forwarding worker output, Ray Data's progress bars, library threads) and every
library logger go to `<storage>/<run>/logs/<stage>.log` only. Output of C code and subprocesses on file
descriptor 2 (compilers probed by DeepSpeed, Ray's core) goes there too. `--verbose` shows it all live.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from llm import storage
from llm.config import PipelineConfig


def log_path(cfg: PipelineConfig, stage: str) -> Path:
    """`<storage>/<run>/logs/<stage>.log`; with object-store storage, `<cache>/logs/<run>/<stage>.log` on the
    driver (a log is appended line by line, which an object store cannot do)."""
    return storage.appendable(storage.join(cfg.storage, cfg.run, "logs", f"{stage}.log"), f"logs/{cfg.run}")


class _Router:
    """A text stream: main-thread writes go to the terminal and the log, other threads' to the log only."""

    def __init__(self, term: IO[str], log: IO[str], verbose: bool) -> None:
        self.term, self.log, self.verbose = term, log, verbose
        self.main = threading.main_thread()

    def write(self, text: str) -> int:
        with contextlib.suppress(ValueError):  # the log closed under a late thread
            self.log.write(text)
        if self.verbose or (threading.current_thread() is self.main and not _from_logging()):
            self.term.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            self.log.flush()
        self.term.flush()

    def isatty(self) -> bool:
        return self.term.isatty()

    def fileno(self) -> int:
        return self.term.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.term, "encoding", "utf-8")


_RAY_WORKER_PY = str(Path("ray") / "_private" / "worker.py")


def _from_logging() -> bool:
    """True when the write comes from a logging handler (a library that created its logger during the
    stage holds our router as its stream: DeepSpeed does at import) or from Ray's forwarding of worker
    output (its last lines are printed from the main thread when Ray shuts down): both belong in the log."""
    frame: Any = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        name = frame.f_code.co_filename
        if name == logging.__file__ or name.endswith(_RAY_WORKER_PY):
            return True
        frame = frame.f_back
    return False


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    loggers = [logging.getLogger()] + [v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler or (isinstance(h, logging.StreamHandler)
                                                    and not isinstance(h, logging.FileHandler)
                                                    and type(h).__module__ != "logging")]


@contextlib.contextmanager
def stage_console(cfg: PipelineConfig, stage: str, what: str, verbose: bool = False) -> Iterator[Path]:
    """Route output for one stage; prints its header line. Yields the log path."""
    global _late
    log = log_path(cfg, stage)
    log.parent.mkdir(parents=True, exist_ok=True)
    term_out, term_err = _terminal(sys.stdout), _terminal(sys.stderr)
    term_out.write(f"== {stage}: {what} -> {cfg.stage_dir(stage)}  (log: {log})\n")
    term_out.flush()
    f = log.open("a", buffering=1)
    f.write(f"\n===== {stage} {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
    sys.stdout, sys.stderr = _Router(term_out, f, verbose), _Router(term_err, f, verbose)
    handlers = [(h, h.stream) for h in _stream_handlers()]
    for h, _ in handlers:
        h.setStream(sys.stderr if verbose else f)
    file_handler = logging.FileHandler(log)
    logging.getLogger().addHandler(file_handler)
    saved_fd = _redirect_fd2(f) if not verbose else None
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield log
    finally:
        logging.captureWarnings(False)
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()
        for h, stream in handlers:
            h.setStream(stream)
        # Ray's log monitor keeps forwarding worker lines for a while after a stage: they go on to this
        # stage's log, never to the terminal, until the next stage routes them or the process ends.
        if _late is not None:
            _late.close()
        _late = f
        sys.stdout, sys.stderr = _Router(term_out, f, verbose), _Router(term_err, f, verbose)


_late: IO[str] | None = None


def _terminal(stream: Any) -> Any:
    return stream.term if isinstance(stream, _Router) else stream


def _redirect_fd2(f: IO[str]) -> int | None:
    try:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        return saved
    except OSError:  # no real fd 2 (embedded interpreters): Python-level routing still applies
        return None


def terminal() -> IO[str]:
    """The terminal stream under a router (or stdout when no stage is running)."""
    out = sys.stdout
    return out.term if isinstance(out, _Router) else out


class LiveLine:
    """One line that updates in place on a terminal (a plain line every `every` seconds elsewhere)."""

    def __init__(self, render: Callable[[], str | None], interval: float = 1.0, every: float = 30.0) -> None:
        self.render, self.interval, self.every = render, interval, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmray-live-line", daemon=True)
        self._last = ""

    def __enter__(self) -> LiveLine:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._show(final=True)

    def _show(self, final: bool = False) -> None:
        text = self.render()
        term = terminal()
        if not text:
            return
        if term.isatty():
            term.write("\r\x1b[2K" + text + ("\n" if final else ""))
        elif text != self._last:
            term.write(text + "\n")
        term.flush()
        self._last = text

    def _run(self) -> None:
        last_plain = 0.0
        while not self._stop.wait(self.interval):
            if terminal().isatty() or time.monotonic() - last_plain >= self.every:
                self._show()
                last_plain = time.monotonic()
