"""One writer per stage folder: a lease file beside the folder, `<stage>._LEASE.json`.

`llm.stage.execute` takes it before it decides anything about the folder and gives it back after the commit
(or the failure). A second run of the same stage refuses in one line naming the holder (host, pid, since
when), or waits for it with `--wait` (`LLMRAY_WAIT=1`). The holder refreshes the heartbeat in it from a
background thread; a lease whose heartbeat is older than `STALE_MISSED` beats, or whose process is gone (same
host), is taken over, and the taker says so in one line. A holder that finds its lease taken does not commit.

The lease lives beside the folder, not in it: moving a committed folder aside or replacing a record happens
under it, and it is in no manifest's file list nor in any hash. Taking it is an exclusive create
(`storage.create_new`: a hard link on a disk, `If-None-Match: *` on S3); taking over a stale one is
conditional on its bytes (`storage.replace_if`, atomic on S3), then read back after a pause. Heartbeats
compare clocks across hosts: keep them in sync (NTP), as any cluster does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial

from llm import storage
from llm.errors import LLMRayError, StageBusyError

LEASE_SUFFIX = "._LEASE.json"
HEARTBEAT_S = 30.0
"""Seconds between two heartbeats of a held lease."""
STALE_MISSED = 4
"""A lease whose heartbeat is this many beats old is stale: its holder is taken to be gone."""
WAIT_POLL_S = 5.0
"""With `--wait`: seconds between two tries to take a held lease."""
SETTLE_S = 1.0
"""After taking over a stale lease: the pause before reading it back (another taker may have raced)."""


def lease_uri(folder: str) -> str:
    """Where the lease of a stage folder lives: beside it."""
    return f"{str(folder).rstrip('/')}{LEASE_SUFFIX}"


def waiting() -> bool:
    """True when `--wait` (or `LLMRAY_WAIT=1`) asks a run to wait for a held lease instead of refusing."""
    return os.environ.get("LLMRAY_WAIT", "").strip().lower() in ("1", "true", "yes")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: what the lease file says."""

    owner: str
    """A fresh id per run of a stage (two runs in one process differ)."""
    host: str
    pid: int
    started: float
    heartbeat: float
    stage: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, blob: bytes, written: float | None) -> Holder:
        """The holder a lease file names; a lease that is not readable JSON (written by hand, or by an
        interrupted best-effort write) counts as held by an unknown run since the file was `written`."""
        try:
            data = json.loads(blob)
            return cls(owner=str(data["owner"]), host=str(data["host"]), pid=int(data["pid"]),
                       started=float(data["started"]), heartbeat=float(data["heartbeat"]),
                       stage=str(data.get("stage", "")))
        except (ValueError, TypeError, KeyError):
            t = written if written is not None else time.time()
            return cls(owner="?", host="an unknown host", pid=0, started=t, heartbeat=t)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {_utc(self.started)}"

    def stale(self, now: float) -> str | None:
        """Why this holder is taken to be gone, or None while it counts as alive."""
        if self.host == socket.gethostname() and self.pid > 0 and not _alive(self.pid):
            return "its process is gone"
        quiet = now - self.heartbeat
        return f"no heartbeat for {quiet:.0f}s" if quiet > STALE_MISSED * HEARTBEAT_S else None


class Lease:
    """The lease of one stage folder, held by this run from `acquire` to `release`.

    Args:
        folder: the stage folder (a local path or an object-store URI).
        stage: its name, for the lines printed and raised.
    """

    def __init__(self, folder: str, stage: str) -> None:
        self.folder, self.stage, self.uri = str(folder), stage, lease_uri(folder)
        self._mine: bytes | None = None
        self._lost: Holder | None = None
        """Who took the lease from this run (None: nobody did, or it was simply gone)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lease; with `wait`, wait for a live holder to give it back (or go stale)."""
        announced = False
        while (holder := self._try()) is not None:
            if not wait:
                age = max(0.0, time.time() - holder.heartbeat)
                raise StageBusyError(
                    f"{self.folder}: another run of {self.stage} holds it ({holder.describe()}; last heartbeat "
                    f"{age:.0f}s ago, lease {self.uri}); rerun with --wait (or LLMRAY_WAIT=1) to wait for it")
            if not announced:
                print(f"{self.stage}: waiting for the run on {holder.describe()} to finish (--wait)", flush=True)
                announced = True
            time.sleep(WAIT_POLL_S)
        self._thread = threading.Thread(target=self._beat, name=f"llmray-lease-{self.stage}", daemon=True)
        self._thread.start()

    def _try(self) -> Holder | None:
        """Take the lease now: None when taken, else who holds it."""
        for _ in range(3):  # a holder that gives it back between our create and our read: try again
            me = Holder(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                        heartbeat=time.time(), stage=self.stage).encode()
            if storage.retrying(self.uri, "creating the lease", partial(storage.create_new, self.uri, me)):
                self._mine = me
                return None
            current = self._read()
            if current == me:  # our own bytes: a retried create whose first answer was lost
                self._mine = me
                return None
            if not current:
                continue
            holder = Holder.decode(current, storage.modified(self.uri))
            why = holder.stale(time.time())
            if why is None:
                return holder
            take = partial(storage.replace_if, self.uri, current, me)
            if not storage.retrying(self.uri, "taking over the lease", take):
                continue  # someone else changed it first: look again
            time.sleep(SETTLE_S)
            if self._read() != me:
                return self._holder_now()
            print(f"{self.stage}: took over the lease of the run on {holder.describe()} ({why})", flush=True)
            self._mine = me
            return None
        return self._holder_now()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if self._mine is None:
                    return
                mine = self._mine
                fresh = replace(Holder.decode(mine, None), heartbeat=time.time()).encode()
                try:
                    kept = storage.replace_if(self.uri, mine, fresh)
                except (OSError, LLMRayError):
                    continue  # a storage hiccup: the next beat tries again, well before the lease is stale
                if kept:
                    self._mine = fresh
                    continue
                self._lost, self._mine = self._holder_now(), None
            print(f"{self.stage}: this run lost its lease on {self.folder} to {self._describe_lost()}; "
                  "it will not commit", flush=True)
            return

    def _read(self) -> bytes:
        """The lease file's bytes; empty when there is none."""
        try:
            return storage.retrying(self.uri, "reading the lease", lambda: storage.read_bytes(self.uri))
        except FileNotFoundError:
            return b""

    def _holder_now(self) -> Holder:
        """Who the lease file names now (an unknown holder when it cannot be read)."""
        try:
            return Holder.decode(self._read(), storage.modified(self.uri))
        except (OSError, LLMRayError):
            return Holder.decode(b"", None)

    def _describe_lost(self) -> str:
        return f"the run on {self._lost.describe()}" if self._lost is not None else "nobody (its lease is gone)"

    def check(self) -> None:
        """Before a commit: `StageBusyError` when this run no longer holds the lease (it was stale and
        another run took it over): committing would put a manifest over another run's files."""
        with self._lock:
            mine = self._mine
            if mine is not None:
                now = self._read()
                if now != mine:
                    self._lost, self._mine = (Holder.decode(now, None) if now else None), None
            if self._mine is None:
                raise StageBusyError(f"{self.folder}: this run lost its lease to {self._describe_lost()} and did "
                                     "not commit; its files are left in place")

    def release(self) -> None:
        """Give the lease back (if this run still holds it); a failure to is one printed line: the lease then
        goes stale and the next run takes it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            mine, self._mine = self._mine, None
        if mine is None:
            return
        try:
            storage.retrying(self.uri, "giving back the lease", lambda: storage.remove_if(self.uri, mine))
        except (OSError, LLMRayError) as e:
            print(f"{self.stage}: could not give back the lease {self.uri} ({storage.one_line(e)}); the next "
                  "run takes it over once it is stale", flush=True)


@contextlib.contextmanager
def hold(folder: str, stage: str, wait: bool | None = None) -> Iterator[Lease]:
    """Hold a stage folder's lease for the length of the block (given back on errors too).

    Args:
        folder: the stage folder.
        stage: its name.
        wait: wait for a live holder instead of refusing; default: `waiting()` (`--wait`, `LLMRAY_WAIT`).
    """
    lease = Lease(folder, stage)
    lease.acquire(waiting() if wait is None else wait)
    try:
        yield lease
    finally:
        lease.release()
