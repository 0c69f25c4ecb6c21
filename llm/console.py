"""The calm console: per stage a header, one live line, the stage's own summary; Ray's chatter in a log file.

Nothing is intercepted: what the stage prints goes to the terminal as printed, and everything else reaches
`<storage>/<run>/logs/<stage>.log` through the channels Ray and `logging` provide for it.
- The root logger gets a handler on the stage log, and warnings log there (`logging.captureWarnings`).
  Loggers that a library gives a terminal handler of its own when imported (Ray's, DeepSpeed's) are
  handed to the root logger (`through_root`: `llm.raycluster.connect` does it for Ray's); those of other
  libraries already imported point their handler at the log for the stage.
- Workers' stdout/stderr, which Ray forwards to the driver (`log_to_driver`), comes through Ray's
  worker-output dispatcher, where the console listens (`connect` takes Ray's own printer off it): each
  line goes to the stage log.
- Progress bars are off (`connect`): the live line is the progress.
`--verbose` adds a terminal handler to the root logger and hands worker output to Ray's printer as well,
so Ray's output shows live, as plain Ray prints it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO, TypeGuard

from llm import storage
from llm.config import PipelineConfig

_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def log_path(cfg: PipelineConfig, stage: str) -> Path:
    """`<storage>/<run>/logs/<stage>.log`; with object-store storage, `<cache>/logs/<run>/<stage>.log` on the
    driver (a log is appended line by line, which an object store cannot do)."""
    return storage.appendable(storage.join(cfg.storage, cfg.run, "logs", f"{stage}.log"), f"logs/{cfg.run}")


class _WorkerOutput:
    """The console's handler on Ray's worker-output dispatcher: each forwarded line into the latest stage's
    log, and to Ray's own printer too under `--verbose`. Ray's log monitor keeps forwarding for a moment
    after a stage ends (a failed worker's last lines among them): those still land in that stage's log."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: IO[str] | None = None
        self._verbose = False

    def follow(self, log: Path, verbose: bool) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
            self._log, self._verbose = log.open("a", buffering=1), verbose

    def __call__(self, data: dict[str, Any]) -> None:
        from ray._private.worker import filter_autoscaler_events, print_to_stdstream

        with self._lock:
            if self._log is not None:
                pid, lines = data.get("pid"), data.get("lines", [])
                if pid == "autoscaler":  # its status table every few seconds: only its events, as Ray prints
                    lines = list(filter_autoscaler_events(lines))
                name = data.get("actor_name") or data.get("task_name")
                for line in lines:
                    self._log.write(f"({name + ' ' if name else ''}pid={pid}) {line}\n")
            if self._verbose:
                print_to_stdstream(data, ignore_prefix=False)


_WORKERS = _WorkerOutput()


def _listen_to_workers() -> None:
    """Register on Ray's dispatcher of forwarded worker output (what `ray.init(log_to_driver=True)` feeds;
    private, but it is Ray's one mechanism for it: `--verbose`'s test notices a change)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(name == "llmray" for name, _ in dispatcher.handlers):
        dispatcher.add_handler("llmray", _WORKERS)


def _to_terminal(h: logging.Handler) -> TypeGuard[logging.StreamHandler[Any]]:
    terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and (
        h.stream in terminal or type(h).__name__ == "PlainRayHandler")  # Ray's: stderr as it is at each record


def through_root(name: str) -> None:
    """The logger `name` and those below it log through the root logger: a terminal handler of their own
    (which Ray's libraries and DeepSpeed add when imported, with `propagate=False`) is removed. The root
    logger's handlers are the console's during a stage (the stage log; the terminal too under `--verbose`);
    outside one, Python's last-resort handler still shows warnings. Idempotent."""
    for key, lg in [(name, logging.getLogger(name)), *list(logging.root.manager.loggerDict.items())]:
        if not isinstance(lg, logging.Logger) or not (key == name or key.startswith(name + ".")):
            continue
        own = [h for h in lg.handlers if _to_terminal(h)]
        for h in own:
            lg.removeHandler(h)
        if own:  # set apart for that handler: now the root's handlers see its records
            lg.propagate = True


def _terminal_handlers() -> list[tuple[logging.Logger, logging.StreamHandler[Any]]]:
    """(logger, handler) for the handlers of any logger that write to the terminal (not to a file)."""
    loggers = [logging.getLogger()] + [v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [(lg, h) for lg in loggers for h in lg.handlers if _to_terminal(h)]


def _to_log(lg: logging.Logger, h: logging.StreamHandler[Any], f: TextIO) -> Callable[[], Any]:
    """Point the terminal handler `h` of `lg` at the stage log `f`; returns how to undo it."""
    try:
        old = h.setStream(f)
        return lambda: h.setStream(old)
    except AttributeError:  # Python's last-resort handler (some libraries add it): its stream is always stderr
        twin = logging.StreamHandler(f)
        twin.setLevel(h.level)
        twin.setFormatter(h.formatter)
        lg.removeHandler(h)
        lg.addHandler(twin)

        def undo() -> None:
            lg.removeHandler(twin)
            lg.addHandler(h)

        return undo


@contextlib.contextmanager
def stage_console(cfg: PipelineConfig, stage: str, what: str, verbose: bool = False) -> Iterator[Path]:
    """Print the stage's header line and send the stage's logging and Ray's output to its log (and to the
    terminal too with `verbose`). Yields the log path."""
    log = log_path(cfg, stage)
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {stage}: {what} -> {cfg.stage_dir(stage)}  (log: {log})", flush=True)
    f = log.open("a", buffering=1)
    f.write(f"\n===== {stage} {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
    handlers: list[logging.Handler] = [logging.StreamHandler(f)]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for h in handlers:
        h.setLevel(logging.INFO)  # Ray Data's logger passes DEBUG records on (its session file keeps those)
        h.setFormatter(_FORMAT)
        root.addHandler(h)
    aside = [] if verbose else [_to_log(lg, h, f) for lg, h in _terminal_handlers() if h not in handlers]
    _WORKERS.follow(log, verbose)
    _listen_to_workers()
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield log
    finally:
        logging.captureWarnings(False)
        for undo in aside:
            undo()
        for h in handlers:
            root.removeHandler(h)
        f.close()


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
        term = sys.stdout
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
            if sys.stdout.isatty() or time.monotonic() - last_plain >= self.every:
                self._show()
                last_plain = time.monotonic()
