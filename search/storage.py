"""Where an experiment lives: a local or shared folder, or a URI (`s3://bucket/prefix`, `gs://...`).

With a URI, Ray Tune writes the trials' checkpoints and results straight to it (from whichever node runs
the trial: no shared filesystem needed), and the driver keeps a local mirror of the rest:

    <uri>/tune/...         Tune's experiment (Tuner.restore reads it from the URI)
    <uri>/sweep.yaml, split.json, optuna.db, leaderboard.*, ensemble/, best_ensemble*, report.html
                           written in the mirror by the driver, then uploaded by `push`

Commands that read an experiment (`status`, `ensemble`, `report`, `export-best`, `resume`) first `pull`
it into the mirror, leaving out the fold resume states (`folds/`, the bulk of each checkpoint), and work
on local files. URIs are pyarrow filesystem URIs (what Ray Tune's `storage_path` takes); an S3-compatible
store is named with query options, e.g. `s3://bucket/x?endpoint_override=host:9000&scheme=http`.
Credentials come from the environment (AWS_* variables, an instance profile), never from configs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["CACHE_ENV", "Experiment", "exists", "is_uri", "join_uri", "mirror_dir", "pull", "push", "read_bytes"]

logger = logging.getLogger(__name__)

CACHE_ENV = "DETSWEEP_CACHE"  # root of the local mirrors (default ~/.cache/detsweep)
SYNCED = ".detsweep-synced.json"  # in a mirror: size and mtime of each file when the URI last matched it
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | os.PathLike) -> bool:
    """True for `scheme://...` (s3://, gs://, file://), False for a plain path."""
    return bool(_URI.match(str(location)))


def join_uri(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended to its path; the query (`?endpoint_override=...`) stays at the end."""
    scheme, netloc, path, query, fragment = urlsplit(uri)
    path = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((scheme, netloc, path, query, fragment))


def _filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    """Whether a file or folder (a key prefix in an object store) exists at `uri`."""
    import pyarrow.fs

    fs, path = _filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The content of the file at `uri`."""
    fs, path = _filesystem(uri)
    with fs.open_input_stream(path) as source:
        return source.read()


def mirror_dir(uri: str) -> Path:
    """The local mirror of an experiment URI: `<cache>/<bucket>/<path>-<hash of the full URI>`."""
    scheme, netloc, path, _, _ = urlsplit(uri)
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "detsweep").expanduser()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{netloc}{path}".strip("/")) or scheme
    return (root / f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}").resolve()


def _excluded(relative: str, exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.split("/") for pattern in exclude)


def pull(uri: str, local: Path, *, exclude: tuple[str, ...] = ()) -> int:
    """Copy the files under `uri` into `local`, skipping paths with a component matching an `exclude`
    pattern and files whose local copy has the same size and modification time. Returns files copied."""
    import pyarrow.fs

    fs, root = _filesystem(uri)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as error:
        raise OSError(f"{uri}: cannot list the experiment ({error}).") from error
    record = _read_record(local)
    copied = 0
    for info in infos:
        if info.type != pyarrow.fs.FileType.File:
            continue
        relative = info.path[len(root):].lstrip("/")
        if _excluded(relative, exclude):
            continue
        target = local / relative
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        if not (target.is_file() and target.stat().st_size == info.size and mtime is not None
                and abs(target.stat().st_mtime - mtime) < 1e-3):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            with fs.open_input_stream(info.path) as source, open(tmp, "wb") as sink:
                while chunk := source.read(1 << 22):
                    sink.write(chunk)
            tmp.replace(target)
            if mtime is not None:
                os.utime(target, (mtime, mtime))
            copied += 1
        record[relative] = [target.stat().st_size, target.stat().st_mtime_ns]  # the URI holds this version
    _write_record(local, record)
    return copied


def _read_record(local: Path) -> dict[str, list[int]]:
    path = Path(local) / SYNCED
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_record(local: Path, record: dict[str, list[int]]) -> None:
    Path(local).mkdir(parents=True, exist_ok=True)
    (Path(local) / SYNCED).write_text(json.dumps(record))




def push(local: Path, uri: str, *, exclude: tuple[str, ...] = ()) -> int:
    """Upload the files under `local` (but paths matching `exclude`) to `uri`, skipping files that have not
    changed since this mirror last uploaded them and that the URI still holds. Returns files uploaded."""
    import pyarrow.fs

    fs, root = _filesystem(uri)
    remote = {
        info.path[len(root):].lstrip("/"): info.size
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        if info.type == pyarrow.fs.FileType.File
    }
    record = _read_record(local)
    uploaded = 0
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        relative = path.relative_to(local).as_posix()
        if _excluded(relative, exclude) or path.name.endswith(".part") or relative == SYNCED:
            continue
        stat = path.stat()
        if record.get(relative) == [stat.st_size, stat.st_mtime_ns] and remote.get(relative) == stat.st_size:
            continue
        if isinstance(fs, pyarrow.fs.LocalFileSystem):  # object stores have no folders to make
            fs.create_dir(f"{root}/{relative}".rsplit("/", 1)[0], recursive=True)
        with open(path, "rb") as source, fs.open_output_stream(f"{root}/{relative}") as sink:
            while chunk := source.read(1 << 22):
                sink.write(chunk)
        record[relative] = [stat.st_size, stat.st_mtime_ns]
        uploaded += 1
    _write_record(local, record)
    return uploaded


@dataclass(frozen=True)
class Experiment:
    """An experiment folder as the driver sees it.

    Attributes:
        local: the folder the driver reads and writes: the experiment itself, or a URI's local mirror.
        uri: the experiment's URI, or None when `local` is the experiment.
    """

    local: Path
    uri: str | None = None

    @classmethod
    def at(cls, location: str | os.PathLike) -> Experiment:
        """The experiment at a path or URI (nothing is read yet)."""
        if is_uri(location):
            return cls(local=mirror_dir(str(location)), uri=str(location))
        return cls(local=Path(location).expanduser().resolve())

    @property
    def tune_storage(self) -> str:
        """What `RunConfig.storage_path` gets: the experiment's URI or folder (Tune adds `name`)."""
        return self.uri or str(self.local)

    def join(self, *parts: str) -> str:
        """A path or URI inside the experiment."""
        return join_uri(self.uri, *parts) if self.uri else str(self.local.joinpath(*parts))

    def pull(self, *, exclude: tuple[str, ...] = ("folds",)) -> None:
        """Bring the URI's files into the mirror (fold resume states left out by default); no-op locally."""
        if self.uri:
            self.local.mkdir(parents=True, exist_ok=True)
            copied = pull(self.uri, self.local, exclude=exclude)
            logger.info("%s: %d files pulled into %s", self.uri, copied, self.local)

    def push(self) -> None:
        """Upload the driver's files (everything but Tune's `tune/`, which Tune writes itself); no-op locally."""
        if self.uri:
            uploaded = push(self.local, self.uri, exclude=("tune",)) if self.local.is_dir() else 0
            logger.info("%s: %d files pushed to %s", self.local, uploaded, self.uri)

    def __str__(self) -> str:
        return self.uri or str(self.local)
