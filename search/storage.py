"""Where an experiment lives: a local or shared folder, or a URI (`s3://bucket/prefix`, `gs://...`).

With a URI, Ray Tune writes the trials' checkpoints and results straight to it (from whichever node runs
the trial: no shared filesystem needed), and the driver keeps a local mirror of the rest:

    <uri>/tune/...         Tune's experiment (Tuner.restore reads it from the URI)
    <uri>/sweep.yaml, split.json, optuna.db, leaderboard.*, ensemble/, best_ensemble*, report.html
                           written in the mirror by the driver, then uploaded by `push`

Commands that read an experiment (`status`, `ensemble`, `report`, `export-best`, `resume`) first `pull`
it into the mirror, leaving out the fold resume states (`folds/`, the bulk of each checkpoint), and work
on local files. `pyarrow.fs.copy_files` copies only files that changed: each copy gets the URI's
modification time (as `rsync -t`), and a file whose size and mtime match the URI's is left alone.
URIs are pyarrow filesystem URIs (what Ray Tune's `storage_path` takes); an S3-compatible store is named
with query options, e.g. `s3://bucket/x?endpoint_override=host:9000&scheme=http`.
Credentials come from the environment (AWS_* variables, an instance profile), never from configs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from detection.files import PART_SUFFIX, atomic_path

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["CACHE_ENV", "Experiment", "exists", "is_uri", "join_uri", "mirror_dir", "pull", "push", "read_bytes"]

logger = logging.getLogger(__name__)

CACHE_ENV = "DETSWEEP_CACHE"  # root of the local mirrors (default ~/.cache/detsweep)
_OLD_RECORD = ".detsweep-synced.json"  # the sync record of mirrors made before mtimes did its job
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


def _files(fs: pyarrow.fs.FileSystem, root: str) -> dict[str, pyarrow.fs.FileInfo]:
    """The files under `root`, by their path relative to it."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {info.path[len(root):].lstrip("/"): info for info in infos if info.type == pyarrow.fs.FileType.File}


def _same(path: Path, info: pyarrow.fs.FileInfo) -> bool:
    """Whether the local file has the size and modification time of the URI's `info` (to the millisecond)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return (info.mtime_ns is not None and stat.st_size == info.size
            and abs(stat.st_mtime_ns - info.mtime_ns) < 1_000_000)


def _stamp(path: Path, info: pyarrow.fs.FileInfo) -> None:
    """Give the local file the URI's modification time (as `rsync -t`): until either side is written
    again, the two count as the same file, with no record kept beside the mirror."""
    if info.mtime_ns is not None:
        os.utime(path, ns=(info.mtime_ns, info.mtime_ns))


def pull(uri: str, local: Path, *, exclude: tuple[str, ...] = ()) -> int:
    """Copy the files under `uri` into `local`, skipping paths with a component matching an `exclude`
    pattern and files whose local copy has the same size and modification time. Returns files copied."""
    import pyarrow.fs

    fs, root = _filesystem(uri)
    try:
        remote = _files(fs, root)
    except OSError as error:
        raise OSError(f"{uri}: cannot list the experiment ({error}).") from error
    copied = 0
    for relative, info in remote.items():
        target = Path(local) / relative
        if _excluded(relative, exclude) or _same(target, info):
            continue
        with atomic_path(target) as tmp:  # a reader of the mirror never sees half a file
            pyarrow.fs.copy_files(info.path, os.path.abspath(tmp), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
        _stamp(target, info)
        copied += 1
    return copied


def push(local: Path, uri: str, *, exclude: tuple[str, ...] = ()) -> int:
    """Upload the files under `local` (but paths matching `exclude`) to `uri`, skipping files that the URI
    holds with the same size and modification time (what `pull` and `push` leave). Returns files uploaded."""
    import pyarrow.fs

    fs, root = _filesystem(uri)
    local = Path(local)
    (local / _OLD_RECORD).unlink(missing_ok=True)
    remote = _files(fs, root)
    uploaded = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        relative = path.relative_to(local).as_posix()
        if _excluded(relative, exclude) or path.name.endswith(PART_SUFFIX) or (
                relative in remote and _same(path, remote[relative])):
            continue
        if isinstance(fs, pyarrow.fs.LocalFileSystem):  # copy_files makes no folders; object stores have none
            fs.create_dir(f"{root}/{relative}".rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(os.path.abspath(path), f"{root}/{relative}",
                              source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
        uploaded.append(relative)
    if uploaded:
        remote = _files(fs, root)  # the store sets a copy's mtime itself
        for relative in uploaded:
            if relative in remote:
                _stamp(local / relative, remote[relative])
    return len(uploaded)


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

    def fetch(self, folder: str | os.PathLike) -> Path:
        """Pull one folder of the experiment (e.g. a trial's checkpoint, fold resume states left out) into the
        mirror when a command needs it, instead of mirroring every trial's; returns its local path. No-op
        locally."""
        folder = Path(folder)
        if self.uri:
            relative = folder.resolve().relative_to(self.local)
            copied = pull(join_uri(self.uri, *relative.parts), folder, exclude=("folds",))
            logger.info("%s: %d files fetched into %s", self.uri, copied, folder)
        return folder

    def push(self) -> None:
        """Upload the driver's files (everything but Tune's `tune/`, which Tune writes itself); no-op locally."""
        if self.uri:
            uploaded = push(self.local, self.uri, exclude=("tune",)) if self.local.is_dir() else 0
            logger.info("%s: %d files pushed to %s", self.local, uploaded, self.uri)

    def __str__(self) -> str:
        return self.uri or str(self.local)
