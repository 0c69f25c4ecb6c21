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

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

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


@functools.lru_cache(maxsize=16)
def _remote_fs(scheme: str, bucket: str, endpoint: str | None) -> pafs.FileSystem:
    if scheme == "s3" and endpoint:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region)
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
    from llm.manifest import file_sha256

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
