"""The one filesystem layer: local paths and object stores (`s3://`, `gs://`) through `pyarrow.fs`.

Every stage folder, manifest, resume marker and checkpoint is reached through these functions, so the
stage contract reads the same on a laptop and on a cluster whose `storage` is a bucket.

Credentials and endpoints: pyarrow's `S3FileSystem` (via `FileSystem.from_uri`) follows the AWS SDK's
standard chain: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, `AWS_PROFILE`,
instance roles, `AWS_DEFAULT_REGION` / `AWS_REGION`; `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (an
S3-compatible server) is passed as `endpoint_override` here, so it holds whatever the pyarrow version.
GCS uses Google's default credentials.

How a stage writes to remote storage (right on a multi-node cluster):
- Small files written by the driver (stats, tokenizer, metrics) go to a driver-local *staging* folder that
  `llm.stage.execute` hands to the stage body; it is uploaded when the body returns, before the manifest.
- Files written by Ray tasks or Train workers never go through the driver's disk: tasks get the store URI
  (`llm.stage.target`) and write there directly (pyarrow writers take URIs) or through `remote_task`, which
  runs a path-based task in a node-local temp folder and uploads its outputs from that node. Ray Train
  checkpoints go to `RunConfig(storage_path=<stage uri>/ray, storage_filesystem=...)`, uploaded by each
  worker; a rank's exports (`model/`, `metrics.jsonl`, `ranks/`) are uploaded by that rank.
- Inputs are read from the store: parquet straight from URIs; a folder a library needs on disk (a
  tokenizer, a model) is downloaded into a local cache and checked against the committed manifest.
- Commit: the manifest object is written last; on an object store a PUT is atomic, so its presence is the
  commit. Setting a folder aside copies every object, checks the copies, then deletes the originals.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

from llm.errors import ConfigError, StorageError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


def is_remote(uri: str | Path) -> bool:
    """True for an object-store URI (s3://, gs://)."""
    return str(uri).startswith(REMOTE_SCHEMES)


def join(uri: str | Path, *parts: str) -> str:
    """`uri/part/...` with single slashes (URIs are not `Path`s: `Path` would fold `s3://` to `s3:/`)."""
    out = str(uri).rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}"
    return out


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


S3_ATTEMPTS = 8
"""Tries of each S3 request inside pyarrow (the AWS SDK's standard strategy: throttling, 5xx and network
errors, exponential backoff), before our own `retrying` sees an error at all."""


@functools.lru_cache(maxsize=16)
def _remote_fs(scheme: str, bucket: str, endpoint: str | None) -> pafs.FileSystem:
    if scheme == "s3":
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
        if endpoint:
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            return pafs.S3FileSystem(endpoint_override=endpoint, region=region, retry_strategy=retry)
        return pafs.S3FileSystem(region=pafs.resolve_s3_region(bucket), retry_strategy=retry)
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an object-store URI."""
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    scheme, rest = uri.split("://", 1)
    scheme = "gs" if scheme == "gcs" else scheme
    return _remote_fs(scheme, rest.split("/", 1)[0], _endpoint() if scheme == "s3" else None), rest.rstrip("/")


def size(uri: str | Path) -> int | None:
    """Size of a file in bytes; None when there is no such file."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def exists(uri: str | Path) -> bool:
    """True when a file or a folder (on an object store: any object under the prefix) is there."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.NotFound:
        return True
    if is_remote(uri):  # S3 "folders" exist only through their objects
        return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)))
    return False


def read_bytes(uri: str | Path) -> bytes:
    """A whole (small) file; `FileNotFoundError` when missing."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read())
    except (FileNotFoundError, OSError) as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower() or isinstance(e, FileNotFoundError):
            raise FileNotFoundError(str(uri)) from None
        raise


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write a whole file atomically: a local temp file renamed into place; one PUT on an object store."""
    if is_remote(uri):
        fs, path = resolve(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(str(uri).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str | Path) -> dict[str, int]:
    """Every file under a folder, recursively, by path relative to it, with its size; {} when none."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(base)}


def sha256(uri: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    fs, path = resolve(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_file(uri: str | Path) -> None:
    """Delete one file if it is there (temporary and marker files only)."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        if size(uri) is not None:
            raise


def remove_tree(uri: str | Path) -> None:
    """Delete a folder of scratch files (a stage's `_work/`, a record replaced on rerun); never a commit."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound and not list_files(uri):
        return
    fs.delete_dir(path)


def move_tree(src: str | Path, dst: str | Path) -> None:
    """Move a folder: a rename on a local disk; on an object store copy every object, check every copy's
    size, and only then delete the originals (an interrupted move leaves both, never neither)."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    if not is_remote(src):
        fs.move(s, d)
        return
    files = list_files(src)
    for rel in files:
        fs.copy_file(f"{s}/{rel}", f"{d}/{rel}")
    copied = list_files(dst)
    missing = [rel for rel, n in files.items() if copied.get(rel) != n]
    if missing:
        raise OSError(f"moving {src} to {dst}: {len(missing)} objects did not copy whole (first: {missing[0]}); "
                      "the originals are kept")
    for rel in files:
        fs.delete_file(f"{s}/{rel}")
    if not list_files(src):  # pyarrow leaves an empty "directory" marker object behind the last delete
        fs.delete_dir(s)


def upload(local: str | Path, uri: str | Path) -> None:
    """Copy a local folder's files under `uri` (existing objects with the same names are replaced)."""
    fs, path = resolve(uri)
    if not is_remote(uri):
        Path(path).mkdir(parents=True, exist_ok=True)
    if any(Path(local).rglob("*")):
        pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)


def absolute(path: str | Path) -> str:
    """A URI as it is; a local path (`file://` stripped, `~` expanded) absolute and resolved."""
    text = str(path)
    return text if is_remote(text) else str(Path(text.removeprefix("file://")).expanduser().resolve())


def within(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or inside it (URIs compared by prefix, local paths once resolved)."""
    inner, outer = absolute(path).rstrip("/"), absolute(folder).rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def readable_here(uri: str | Path, tmp: str | Path, files: list[str]) -> Path:
    """A local folder holding `files` of `uri`: the folder itself when local, else those files downloaded
    into `tmp`."""
    return Path(uri) if not is_remote(uri) else download(uri, tmp, dict.fromkeys(files, 0))


def file_here(uri: str, tmp: str | Path) -> Path | None:
    """One file as a local path: the file itself when local, else a copy in `tmp`; None when it is not there."""
    if not is_remote(uri):
        return Path(uri) if Path(uri).is_file() else None
    local = Path(tmp) / uri.rsplit("/", 1)[-1]
    try:
        local.write_bytes(read_bytes(uri))
    except FileNotFoundError:
        return None
    return local


def download(uri: str | Path, local: str | Path, files: dict[str, int] | None = None) -> Path:
    """Copy the files under `uri` (or only `files`: relative path -> size) into a local folder."""
    fs, path = resolve(uri)
    out = Path(local)
    for rel in sorted(files if files is not None else list_files(uri)):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{path}/{rel}", str(dest), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return out


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a local file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where downloaded inputs are kept on this node (`LLMRAY_CACHE`, default `~/.cache/llmray`)."""
    return Path(os.environ.get("LLMRAY_CACHE") or Path.home() / ".cache" / "llmray")


def cached_copy(uri: str | Path, files: dict[str, dict[str, Any]] | None = None) -> Path:
    """A local copy of a remote folder (a tokenizer, a model) kept in `cache_dir()`, whose files have the
    sizes (and sha256, when `files` gives them) recorded for them; a local path is returned as is.

    Args:
        uri: the folder.
        files: relative path -> {"size", "sha256"} from the committed manifest; default: what is listed now.
    """
    if not is_remote(uri):
        return Path(str(uri).removeprefix("file://"))
    want = files if files is not None else {rel: {"size": n} for rel, n in list_files(uri).items()}
    key = hashlib.sha256(repr((str(uri), sorted((k, v.get("size"), v.get("sha256")) for k, v in want.items())))
                         .encode()).hexdigest()[:24]
    out = cache_dir() / "inputs" / key
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=out.parent))
    download(uri, tmp, {rel: int(meta["size"]) for rel, meta in want.items()})
    for rel, meta in want.items():
        got = tmp / rel
        if got.stat().st_size != meta["size"] or (meta.get("sha256") and file_sha256(got) != meta["sha256"]):
            raise OSError(f"{join(uri, rel)}: the downloaded copy differs from the committed one")
    (tmp / ".complete").touch()
    try:
        tmp.rename(out)
    except OSError:  # another process on this node finished the same copy first
        if not (out / ".complete").exists():
            raise
    return out


def ray_storage(uri: str | Path) -> tuple[str, pafs.FileSystem | None]:
    """`(storage_path, storage_filesystem)` for Ray Train / Tune's `RunConfig`."""
    if not is_remote(uri):
        return os.path.abspath(str(uri)), None
    fs, path = resolve(uri)
    return path, fs


def remote_task(fn: Any, *, local_args: tuple[str, ...] = (), out_arg: str = "out_dir") -> Any:
    """Wrap a Ray task that reads/writes local paths so it works with store URIs on any node.

    `local_args` that hold a remote folder are replaced by a verified local cache copy; a remote `out_arg`
    is replaced by a node-local temp folder whose files are uploaded to the store when the task returns,
    and any string in the returned batch that names a file in it is rewritten to its store URI.
    """

    def run(batch: Any, **kwargs: Any) -> Any:
        for name in local_args:
            value = kwargs.get(name)
            if isinstance(value, str) and is_remote(value):
                kwargs[name] = str(cached_copy(value))
        target = kwargs.get(out_arg)
        if not (isinstance(target, str) and is_remote(target)):
            return fn(batch, **kwargs)
        with tempfile.TemporaryDirectory(prefix="llmray-task-") as tmp:
            kwargs[out_arg] = tmp
            out = fn(batch, **kwargs)
            upload(tmp, target)
        return _rewrite(out, tmp, target)

    return run


def _rewrite(out: Any, tmp: str, target: str) -> Any:
    def fix(v: Any) -> Any:
        return join(target, v[len(tmp):]) if isinstance(v, str) and v.startswith(tmp) else v

    if isinstance(out, dict):
        return {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in out.items()}
    return out


def appendable(uri: str | Path, cache_key: str) -> Path:
    """A local file this process can append to line by line for `uri` (a log): the file itself on a disk;
    `<cache>/<cache_key>/<name>` on this node for an object store, which cannot append."""
    if not is_remote(uri):
        return Path(os.path.abspath(str(uri).removeprefix("file://")))
    return cache_dir() / cache_key / str(uri).rsplit("/", 1)[-1]


def fetch(uri: str | Path, files: dict[str, dict[str, Any]] | None = None) -> Path:
    """A checked local copy of a folder a library needs on disk (a tokenizer, a model): the folder itself
    when it is local, else a copy in this node's cache (see `cached_copy`)."""
    return cached_copy(uri, files)


@contextlib.contextmanager
def writing(uri: str | Path) -> Iterator[Path]:
    """A local folder whose files end up under `uri`: `uri` itself when it is local; otherwise a node-local
    temp folder uploaded to the store when the block exits without an error."""
    if not is_remote(uri):
        out = Path(str(uri).removeprefix("file://"))
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="llmray-out-") as tmp:
        yield Path(tmp)
        upload(tmp, uri)


def open_for_writing(uri: str | Path) -> Folder:
    """A stage's folder for its body: on a disk the folder itself (made); with an object store a fresh
    driver-local staging folder for the files this process writes (the store holds everything else)."""
    if not is_remote(uri):
        folder = Folder(uri)
        Path(folder.uri).mkdir(parents=True, exist_ok=True)
        return folder
    local = cache_dir() / "staging" / hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    return Folder(uri, local)


class Folder:
    """One folder, on a local or shared disk or in an object store, behind one set of methods (the seam that
    keeps every stage free of `if remote:` branches; datatrove's `DataFolder` has the same idea).

    `uri` is where writers on any node write (pyarrow writers, Ray tasks, Train workers: they take it as a
    string). `local` is where this process writes the files it makes itself: the folder itself on a local
    disk; with an object store a driver-local staging folder, uploaded when the stage body returns (or
    earlier with `publish`). Reads see both.

    Args:
        uri: a local path or an `s3://` / `gs://` URI (`file://` is stripped).
        local: the staging folder for an object-store folder (None: a folder that is only read).
        files: the committed files (relative path -> {"size", "sha256"}) that `fetch` checks copies against.
    """

    def __init__(self, uri: str | Path, local: Path | None = None,
                 files: dict[str, dict[str, Any]] | None = None) -> None:
        text = str(uri).removeprefix("file://")
        self.uri = text.rstrip("/") if is_remote(text) else os.path.abspath(os.path.expanduser(text))
        self._local = local
        self.files = files

    def __repr__(self) -> str:
        return f"Folder({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @property
    def local(self) -> Path:
        """Where this process writes the folder's files (see the class docstring)."""
        if self._local is not None:
            return self._local
        if is_remote(self.uri):
            raise ValueError(f"{self.uri}: an object-store folder read here has no local side; use fetch()")
        return Path(self.uri)

    @property
    def on_disk(self) -> bool:
        """True when `uri` is a path on this machine's (local or shared) disk."""
        return not is_remote(self.uri)

    def path(self, *parts: str) -> str:
        """The URI (or path) of a file or folder inside, for writers on any node and for pyarrow readers."""
        return join(self.uri, *parts)

    def child(self, *parts: str) -> Folder:
        """A folder inside this one (its staging side inside this one's)."""
        local = self._local.joinpath(*parts) if self._local is not None else None
        files = None if self.files is None else {
            rel[len(join(*parts)) + 1:]: meta for rel, meta in self.files.items() if rel.startswith(join(*parts) + "/")}
        return Folder(self.path(*parts), local, files)

    def exists(self, *parts: str) -> bool:
        return exists(self.path(*parts)) or (self._local is not None and self._local.joinpath(*parts).exists())

    def size(self, *parts: str) -> int | None:
        """Size of a file in bytes; None when there is no such file."""
        if self._local is not None and self._local.joinpath(*parts).is_file():
            return self._local.joinpath(*parts).stat().st_size
        return size(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        """A whole (small) file, from the staging side when this process wrote it there."""
        if self._local is not None and self._local.joinpath(*parts).is_file():
            return self._local.joinpath(*parts).read_bytes()
        return read_bytes(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically (on the staging side with an object store)."""
        write_bytes(self.local / rel, data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def list(self, *parts: str) -> dict[str, int]:
        """Every file under a folder inside (recursively, relative to it) with its size, both sides merged."""
        out = list_files(self.path(*parts))
        if self._local is not None and self._local.joinpath(*parts).is_dir():
            out.update(list_files(self._local.joinpath(*parts)))
        return out

    def remove(self, *parts: str) -> None:
        """Delete a scratch file or folder inside (never a commit), on both sides."""
        if self._local is not None:
            target = self._local.joinpath(*parts)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        remove_tree(self.path(*parts)) if list_files(self.path(*parts)) else remove_file(self.path(*parts))

    def publish(self, *parts: str) -> str:
        """Make what this process wrote under `local/<parts>` readable by workers on any node now (uploaded
        with an object store; already there on a disk); returns its URI."""
        if self._local is not None and self._local.joinpath(*parts).exists():
            upload(self._local.joinpath(*parts), self.path(*parts))
        return self.path(*parts)

    def pull(self, *parts: str) -> Path:
        """What writers on other nodes wrote under `<parts>`, on this process's local side (`publish`'s
        reverse): downloaded from an object store into the staging folder; already there on a disk. Returns
        `local/<parts>`."""
        here = self.local.joinpath(*parts)
        if self._local is not None:
            download(self.path(*parts), here)
        return here

    def upload(self, local: str | Path, *parts: str) -> str:
        """Copy a local folder's files into `<parts>` of this folder (nothing to do when it is that very
        folder on disk); returns the URI."""
        where = self.path(*parts)
        if Path(local).resolve() != Path(where).resolve() or not self.on_disk:
            upload(local, where)
        return where

    def fetch(self, *parts: str) -> Path:
        """A checked local copy of a folder (or the whole folder) inside, for libraries that need a disk path:
        the folder itself on a disk; otherwise a cached download whose files have the committed sizes and
        sha256 (when this folder knows them)."""
        if self._local is not None and self._local.joinpath(*parts).exists():
            return self._local.joinpath(*parts)
        sub = self.child(*parts) if parts else self
        return fetch(sub.uri, sub.files)

    def ray_storage(self, *parts: str) -> tuple[str, pafs.FileSystem | None]:
        """`(storage_path, storage_filesystem)` for Ray Train / Tune's `RunConfig` under this folder."""
        return ray_storage(self.path(*parts))

    def flush(self, sidecar: str) -> None:
        """Upload the staging side (object stores), with a JSON sidecar at `sidecar` holding each staged
        file's size and sha256, so a commit does not read them back; nothing to do on a disk."""
        if self._local is None:
            return
        base = self._local
        sums = {p.relative_to(base).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(base.rglob("*")) if p.is_file()
                and not p.relative_to(base).as_posix().startswith(sidecar.split("/")[0] + "/")}
        if sums:
            (base / sidecar).parent.mkdir(parents=True, exist_ok=True)
            (base / sidecar).write_text(json.dumps(sums, sort_keys=True))
            upload(base, self.uri)

    def close(self) -> None:
        """Remove the staging side once its files are in the store."""
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)

    def require_disk(self, error: str) -> Path:
        """This folder as a local path; `ConfigError(error)` (one line naming the key) in an object store."""
        if not self.on_disk:
            raise ConfigError(error)
        return Path(self.uri)


def subfolders(uri: str | Path) -> list[str]:
    """Names of the folders right inside `uri` (on an object store: the common prefixes), sorted; [] when none."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


@contextlib.contextmanager
def reading(uri: str | Path, keep: Callable[[str], bool] | None = None, under: str | Path | None = None,
            check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A local folder holding the files under `uri` for the length of the block: `uri` itself on a disk (read
    in place, nothing copied); otherwise a temp copy removed afterwards (a checkpoint read once by one process:
    not worth a place in the cache that `fetch` fills).

    Args:
        uri: the folder.
        keep: which files a copy holds (relative path -> bool; default: all), e.g. one rank's part of a
            checkpoint; the others are not downloaded.
        under: where a copy goes (a node-local working folder; default: the system's temp folder).
        check: called with a copy before the block sees it (raises when the copy is not what was written).
    """
    if not is_remote(uri):
        yield Path(str(uri).removeprefix("file://"))
        return
    if under is not None:
        Path(under).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmray-in-", dir=under) as tmp:
        files = {rel: n for rel, n in list_files(uri).items() if keep is None or keep(rel)}
        local = download(uri, tmp, files)
        if check is not None:
            check(local)
        yield local


def ray_uri(filesystem: pafs.FileSystem, path: str) -> str:
    """The URI of what Ray Train names by (filesystem, path), e.g. a reported checkpoint: the path itself on a
    disk, `<scheme>://<path>` in an object store."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    scheme = "gs" if filesystem.type_name == "gcs" else filesystem.type_name
    return f"{scheme}://{path}"


def disk_path(filesystem: pafs.FileSystem, path: str) -> Path | None:
    """`path` of a pyarrow filesystem (Ray Train's `storage_filesystem`) as a path on this machine's (local or
    shared) disk, where a worker can write in place; None for an object store."""
    return Path(path) if isinstance(filesystem, pafs.LocalFileSystem) else None


def write_scratch(uri: str | Path, data: Any) -> None:
    """Write a scratch file whole (`data`: any bytes-like object), for files under a stage's `_work/` that are
    removed before the commit: a plain write on a disk (no temp file, no fsync), one PUT on an object store."""
    if is_remote(uri):
        write_bytes(uri, bytes(data))
        return
    path = Path(str(uri).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def map_file(uri: str | Path) -> Any:
    """A whole file as a read-only buffer: memory-mapped on a disk (pages are read when touched), read whole
    from an object store."""
    if is_remote(uri):
        return read_bytes(uri)
    with open(str(uri).removeprefix("file://"), "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""


def read_ranges(uri: str | Path, ranges: list[tuple[int, int]]) -> list[Any]:
    """The bytes `[start, stop)` of a file for each of `ranges`, as read-only buffers: slices of a memory map
    on a disk (nothing read until touched), one ranged read each from an object store."""
    if not is_remote(uri):
        view = memoryview(map_file(uri))
        return [view[a:b] for a, b in ranges]
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return [f.read_at(b - a, a) for a, b in ranges]


def read_gap(uri: str | Path) -> float:
    """Bytes between two wanted ranges of a file under which one read across both beats two (`read_ranges`):
    unbounded on a disk (a memory map reads only the pages touched), 64 KiB on an object store (each ranged
    read is a request)."""
    return 1 << 16 if is_remote(uri) else float("inf")


# The stage contract's own small files (manifest, attempt marker, lease): transient errors retried, and
# writes that only succeed while no other writer got there first.

RETRIES = 4
"""Tries of one read or write of a contract file before its error is reported (pyarrow's S3 retry strategy
runs inside each try)."""
BACKOFF_S = 0.5
"""Pause before the second try; doubled before each next one (0.5 + 1 + 2 s in all by default)."""
SETTLE_S = 1.0
"""Where a conditional write is only a best effort: the pause before reading back who won."""

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE}
_PERMANENT = ("access denied", "access_denied", "accessdenied", "forbidden", "invalidaccesskeyid", "nosuchbucket",
              "signaturedoesnotmatch", "not found", "does not exist", "no such")
_T = TypeVar("_T")


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type when it has none), at most 300 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _transient(uri: str | Path, e: OSError) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if not is_remote(uri):
        return e.errno in _TRANSIENT_ERRNOS
    text = str(e).lower()
    return not any(marker in text for marker in _PERMANENT)


def retrying(uri: str | Path, what: str, call: Callable[[], _T]) -> _T:
    """`call()`, with transient storage errors (throttling, timeouts, a dropped connection, a stale NFS
    handle) tried again after a growing pause; after `RETRIES` tries one line: `StorageError`. Other errors
    (not found, access denied, a full disk) pass through at once."""
    for n in range(1, RETRIES + 1):
        try:
            return call()
        except OSError as e:
            if not _transient(uri, e):
                raise
            if n == RETRIES:
                raise StorageError(f"{uri}: {what} failed {RETRIES} times; the last error: {one_line(e)}") from e
            time.sleep(BACKOFF_S * 2 ** (n - 1))
    raise AssertionError("unreachable")


def modified(uri: str | Path) -> float | None:
    """When a file was last written (seconds since the epoch, the storage's clock); None when it is missing."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime is not None else None


@functools.lru_cache(maxsize=4)
def _boto3_s3(endpoint: str | None) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # boto3 is optional: conditional writes fall back to the best effort
        return None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=Config(retries={"mode": "standard", "max_attempts": S3_ATTEMPTS}))


def _s3_client(uri: str | Path) -> Any:
    """A boto3 S3 client for conditional requests (pyarrow has none), or None: not S3, or no boto3."""
    return _boto3_s3(_endpoint()) if str(uri).startswith("s3://") else None


def _conditional(uri: str | Path, call: Callable[[], Any]) -> bool:
    """Run a conditional S3 request: False when its condition failed (or the object is gone), errors as
    `OSError` so that `retrying` and the callers treat them like pyarrow's."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        call()
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        # 409 ConditionalRequestConflict: another conditional write to the key is in flight (it wins).
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412):
            return False
        raise OSError(f"{uri}: {one_line(e)}") from e
    except BotoCoreError as e:
        raise OSError(f"{uri}: {one_line(e)}") from e


def _bucket_key(uri: str | Path) -> tuple[str, str]:
    bucket, _, key = str(uri).split("://", 1)[1].partition("/")
    return bucket, key


def create_new(uri: str | Path, data: bytes) -> bool:
    """Write a small file only when there is none yet; False when there is one (another writer was first).

    Exclusive on a disk (a hard link to a whole temp file: the file appears whole or not at all; an exclusive
    `open` where hard links are not supported) and on S3 (a PUT with `If-None-Match: *`, through boto3 when
    it is installed). Elsewhere (GCS, S3 without boto3) a best effort: written when absent, then read back
    after `SETTLE_S` and compared; two writers within that pause may both believe they won.
    """
    if not is_remote(uri):
        return _create_local(Path(os.path.abspath(str(uri).removeprefix("file://"))), data)
    client = _s3_client(uri)
    if client is not None:
        bucket, key = _bucket_key(uri)
        return _conditional(uri, lambda: client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"))
    if size(uri) is not None:
        return False
    write_bytes(uri, data)
    time.sleep(SETTLE_S)
    return read_bytes(uri) == data


def _create_local(target: Path, data: bytes) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)  # fails when the target exists: the exclusive create
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            pass
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def replace_if(uri: str | Path, expected: bytes, data: bytes) -> bool:
    """Replace a small file with `data` only while it holds `expected`; False when it holds anything else or
    is gone. On S3 (boto3) the PUT is conditional on the ETag read with `expected`: atomic. Elsewhere the
    check and the atomic replace are two steps, and a writer between them is not seen (callers that must
    know read the file back)."""
    client = _s3_client(uri)
    if client is not None:
        bucket, key = _bucket_key(uri)
        got: dict[str, Any] = {}

        def read() -> None:
            answer = client.get_object(Bucket=bucket, Key=key)
            got.update(etag=answer["ETag"], body=answer["Body"].read())

        if not _conditional(uri, read) or got["body"] != expected:
            return False
        return _conditional(uri, lambda: client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=got["etag"]))
    try:
        if read_bytes(uri) != expected:
            return False
    except FileNotFoundError:
        return False
    write_bytes(uri, data)
    return True


def remove_if(uri: str | Path, expected: bytes) -> bool:
    """Delete a small file only while it holds `expected` (a lease its holder gives back); False otherwise."""
    try:
        if read_bytes(uri) != expected:
            return False
    except FileNotFoundError:
        return False
    remove_file(uri)
    return True


_WILD = "*?["


def _matches(pattern: str, path: str) -> bool:
    """`fnmatch` per path segment (a `*` never crosses a `/`; `**` matches any number of segments)."""
    import fnmatch

    pat, parts = pattern.strip("/").split("/"), path.strip("/").split("/")

    def match(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(parts)
        if pat[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(parts) + 1))
        return j < len(parts) and fnmatch.fnmatchcase(parts[j], pat[i]) and match(i + 1, j + 1)

    return match(0, 0)


def fingerprint(pattern: str | Path) -> str:
    """What an input outside the run is now, for a stage's hash: `<n> files, <bytes> bytes, <digest>` of
    the size and modification time (ns) of every file a path, folder or glob names (local or object
    store); `missing` when none. Cheap: nothing is read, so a corpus of any size is fingerprinted by listing.
    A storage that cannot be listed is one line naming the input (`StorageError`)."""
    try:
        return retrying(pattern, "listing", lambda: _fingerprint(pattern))
    except OSError as e:
        raise StorageError(f"{pattern}: cannot list this input to fingerprint it: {one_line(e)}") from e


def _fingerprint(pattern: str | Path) -> str:
    text = str(pattern).removeprefix("file://")
    if not is_remote(text):
        text = os.path.expanduser(text)
    fs, path = resolve(text)
    segments = path.split("/")
    wild = next((i for i, s in enumerate(segments) if any(c in s for c in _WILD)), None)
    if wild is None:
        top = fs.get_file_info(path)
        if top.type == pafs.FileType.File:
            infos = [top]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    else:
        base = "/".join(segments[:wild]) or "/"
        found = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
        infos = [i for i in found if _matches(path, i.path)]
    files = sorted((i.path, i.size or 0, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File)
    if not files:
        return "missing"
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    return f"{len(files)} files, {sum(f[1] for f in files)} bytes, {digest}"
