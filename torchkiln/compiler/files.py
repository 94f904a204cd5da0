"""Artifact directories on disk: written so that nothing is ever lost or half-written, read so that
nothing outside the directory (or unlisted in it) is ever touched.

Destinations (:func:`check_destination`, :func:`check_file_destination`). Every path torchkiln
writes — an artifact, a build, its ``.partition/``, a partition, ``kiln tune``'s output, a cache
entry, the pipeline's ``.npz``, a plot — is asked about here, by every writer, before any work starts
and again when written. A destination is replaced only if it is missing, an empty directory, or
*ours of the same kind*: a directory whose marker file (:data:`MARKERS`: read without following
links) holds our format string, a file that carries our marker inside (an ``.npz`` member, a PNG
text chunk). A file name alone never makes a path ours: a user may have a ``trials.json`` too. The
current directory and its ancestors are never replaced.

Writing (:func:`atomic_directory`, :func:`atomic_file`). A writer builds the new directory (file)
in a staging path beside the destination and swaps it in; a failure before the swap leaves the
destination as it was. The swap keeps a complete directory at the
destination at every instant: ``renameat2(RENAME_EXCHANGE)`` exchanges the two directories in one
step (Linux); where the file system cannot, the old one is renamed aside and the new one in, and a
writer killed between those two renames is recovered from: readers read the aside copy
(:func:`resolve_interrupted`) and the next writer renames it back. Writers of one
destination are serialised by an ``flock`` on ``.<name>.lock`` beside it (removed again when
released); whatever a dead writer left (``.<name>.tmp-*`` / ``.<name>.old-*``) is removed by the
next writer, under the lock. ``OSError`` while writing (a full disk) is an :class:`ArtifactError`
and the previous directory is left as it was.

Reading (:func:`open_directory`, :func:`copy_verified`). Names come from a manifest a user may have
edited: each must be a plain file name (no ``/``, no ``..``) of a regular file (a symbolic link is
refused), opened relative to the directory's descriptor, and its SHA-256 is computed while it is
copied into a private directory — so what is verified is exactly what is then used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from torchkiln.errors import ArtifactError, DestinationError

LOCK_TIMEOUT_S = 600.0
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _no_crash(step: str) -> None:
    """Tests replace this to kill a writer at a named step (see tests/test_artifact_safety.py)."""


after_step: Callable[[str], None] = _no_crash


#: kind of directory -> (the file that marks it ours, the "format" that file's JSON object holds)
MARKERS: dict[str, tuple[str, str]] = {
    "artifact": ("manifest.json", "torchkiln-artifact"),
    "partition": ("partition.json", "torchkiln-partition"),
    "tune": ("tune.json", "torchkiln-tune"),
    "cache": ("cache-entry.json", "torchkiln-cache-entry"),
}
#: kind of output file -> its suffix; the marker each carries is written by :func:`mark_npz` /
#: :data:`PNG_MARKER`
FILE_KINDS: dict[str, str] = {"npz": ".npz", "png": ".png"}
NPZ_MARKER = "__torchkiln__"
PNG_MARKER = {"Software": None, "torchkiln": "torchkiln-output"}  # savefig(metadata=...): a tEXt chunk


def is_ours(path: Path, kind: str) -> bool:
    """Does the directory ``path`` hold a ``kind`` torchkiln wrote (its marker file, read without
    following links, names our format)?"""
    marker, format_name = MARKERS[kind]
    try:
        with open_directory(path) as fd:
            content = parse_json(read_member(fd, marker, str(path), limit=64 << 20), str(path / marker))
    except (ArtifactError, ValueError):
        return False
    return isinstance(content, dict) and content.get("format") == format_name


def write_marker(directory: Path, kind: str, **content: Any) -> None:
    """The marker file that makes ``directory`` (a staging directory) ours of ``kind``; for kinds
    whose marker is not already a manifest of their own (tune output, cache entries)."""
    marker, format_name = MARKERS[kind]
    write_atomic(directory / marker, json.dumps({"format": format_name, **content}, indent=2) + "\n")


def check_destination(
    destination: str | os.PathLike[str], kind: str, reads: Iterable[tuple[str, str | os.PathLike[str]]] = ()
) -> Path:
    """The directory a writer of ``kind`` will replace, refused (:class:`DestinationError`, an ArtifactError) when
    replacing it could lose something that is not ours: a file, a non-empty directory that is not
    a ``kind`` of ours, the current directory or one of its parents, or a directory holding a file
    the writer reads (``reads``: ``(what, path)`` pairs, e.g. the recipe and the model's source)."""
    with _unusable_path(destination):
        return _check_destination(destination, kind, reads)


def _check_destination(
    destination: str | os.PathLike[str], kind: str, reads: Iterable[tuple[str, str | os.PathLike[str]]]
) -> Path:
    if kind not in MARKERS:
        raise ValueError(f"unknown destination kind {kind!r}")
    dest = Path(destination)
    if dest.is_symlink():  # write where the link points; the link itself stays
        dest = Path(os.path.realpath(dest))
    _refuse_current_directory(dest, destination)
    _refuse_inputs(dest, reads)
    if dest.exists() and not dest.is_dir():
        raise DestinationError(
            f"{dest} exists and is not a directory", where=str(dest), hint="choose another output path"
        )
    if dest.is_dir() and not _is_empty(dest) and not is_ours(dest, kind):
        what = "torchkiln artifact" if kind == "artifact" else f"torchkiln {kind} directory"
        raise DestinationError(
            f"{dest} is a directory that is not a {what}; refusing to replace it",
            where=str(dest),
            hint=f"choose a new path, e.g. {dest / kind}, or remove the directory yourself",
        )
    return dest


def check_file_destination(
    destination: str | os.PathLike[str], kind: str, reads: Iterable[tuple[str, str | os.PathLike[str]]] = ()
) -> Path:
    """The file a writer of ``kind`` (:data:`FILE_KINDS`) will replace: a path with the kind's suffix
    that is missing or a file we wrote (it carries our marker) and not one the writer reads
    (``reads``, as for :func:`check_destination`); anything else is refused."""
    with _unusable_path(destination):
        return _check_file_destination(destination, kind, reads)


@contextlib.contextmanager
def _unusable_path(destination: str | os.PathLike[str]) -> Iterator[None]:
    """A path the system cannot even look at (a name over 255 bytes, a component that is a file) is
    a DestinationError naming it, not a bare OSError."""
    try:
        yield
    except OSError as exc:
        raise DestinationError(f"cannot write to {destination}: {exc.strerror or exc}", where=str(destination),
                               hint="choose another output path") from None  # fmt: skip


def _check_file_destination(
    destination: str | os.PathLike[str], kind: str, reads: Iterable[tuple[str, str | os.PathLike[str]]]
) -> Path:
    suffix = FILE_KINDS[kind]
    dest = Path(destination)
    if dest.suffix != suffix:
        raise DestinationError(f"{destination}: the output must be a {suffix} file", where=str(destination),
                            hint=f"name a file ending in {suffix}")  # fmt: skip
    _refuse_current_directory(dest, destination)
    _refuse_inputs(dest, reads)
    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        raise DestinationError(f"{dest} exists and is not a plain file", where=str(dest), hint="choose another output path")
    if dest.exists() and not _file_is_ours(dest, kind):
        raise DestinationError(
            f"{dest} is a file torchkiln did not write; refusing to replace it",
            where=str(dest),
            hint="choose a new file name, or remove the file yourself",
        )
    return dest


def _refuse_current_directory(dest: Path, given: str | os.PathLike[str]) -> None:
    here, absolute = Path.cwd().resolve(), dest.resolve()
    if dest.name in ("", ".", "..") or absolute == here or absolute in here.parents:
        raise DestinationError(
            f"cannot write to {given}: it is the current directory or one of its parents",
            where=str(given),
            hint="name a new subdirectory, e.g. -o ./artifact",
        )


def _refuse_inputs(dest: Path, reads: Iterable[tuple[str, str | os.PathLike[str]]]) -> None:
    """A writer never replaces what it reads: the destination is not one of ``reads`` nor holds one."""
    target = dest.resolve()
    for what, path in reads:
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise DestinationError(
                f"{dest} holds {what} ({path}), which this run reads: writing there would delete it",
                where=str(path),
                hint="write to another path, or move the inputs out of the destination first",
            )


def _file_is_ours(path: Path, kind: str) -> bool:
    try:
        if kind == "npz":
            with zipfile.ZipFile(path) as archive:
                return f"{NPZ_MARKER}.npy" in archive.namelist()
        with open(path, "rb") as handle:  # PNG: our tEXt chunk is written before the image data
            return b"tEXttorchkiln\x00torchkiln-output" in handle.read(1 << 16)
    except (OSError, zipfile.BadZipFile):
        return False


def mark_npz(arrays: dict[str, Any]) -> dict[str, Any]:
    """``arrays`` plus the member that marks an ``.npz`` as ours."""
    import numpy as np

    return {**arrays, NPZ_MARKER: np.array("torchkiln-output")}


@contextlib.contextmanager
def atomic_file(destination: str | os.PathLike[str], kind: str) -> Iterator[Path]:
    """Yield a staging path beside ``destination`` (checked by :func:`check_file_destination`);
    on success it is renamed over ``destination`` in one step, on any failure it is removed and
    ``destination`` is left as it was."""
    dest = check_file_destination(destination, kind)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(dest, exc) from exc
    partial = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}{dest.suffix}")
    try:
        yield partial
        check_file_destination(dest, kind)  # again: the work may have taken long
        os.replace(partial, dest)
    except OSError as exc:
        raise _write_error(dest, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)


def remove_private(path: Path) -> None:
    """Remove a directory torchkiln made for itself (:func:`private_directory`, a staging copy)."""
    shutil.rmtree(path, ignore_errors=True)


def _is_empty(path: Path) -> bool:
    try:
        return not any(os.scandir(path))
    except OSError:
        return False


@contextlib.contextmanager
def atomic_directory(
    destination: str | os.PathLike[str], kind: str, lock_timeout: float = LOCK_TIMEOUT_S
) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``destination``; on success it replaces
    ``destination`` (see the module docstring), on any failure it is removed and ``destination``
    is left as it was."""
    dest = check_destination(destination, kind)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(dest, exc) from exc
    with _locked(dest, lock_timeout):
        _clean_up_after_dead_writers(dest)
        dest = check_destination(dest, kind)  # again, under the lock
        staging = _sibling(dest, "tmp")
        try:
            os.mkdir(staging, 0o777)  # the umask applies, as to any directory the user makes
            yield staging
            _sync_tree(staging)
            after_step("synced")
            _swap_in(staging, dest)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _write_error(dest, exc) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _write_error(dest: Path, exc: OSError) -> ArtifactError:
    hint = "free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable path"
    return ArtifactError(
        f"cannot write to {dest}: {exc.strerror or exc} (nothing there was changed)",
        where=str(exc.filename or dest),
        hint=hint,
    )


def _sibling(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{uuid.uuid4().hex[:12]}"


def _leftovers(dest: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.{kind}-[0-9a-f]{{12}}")
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    found = [dest.parent / n for n in names if pattern.fullmatch(n)]
    return sorted(found, key=lambda p: p.lstat().st_mtime_ns if p.exists() else 0)


def _swap_in(staging: Path, dest: Path) -> None:
    if not dest.exists() or _is_empty(dest):
        os.rename(staging, dest)  # onto nothing or an empty directory: one atomic step
        after_step("renamed")
    elif _exchange(staging, dest):
        after_step("exchanged")  # dest is new; staging holds the old one
        shutil.rmtree(staging, ignore_errors=True)
    else:
        aside = _sibling(dest, "old")
        os.rename(dest, aside)
        after_step("between-renames")  # dest is missing here: readers use `aside`, writers restore it
        os.rename(staging, dest)
        after_step("renamed")
        shutil.rmtree(aside, ignore_errors=True)
    _sync_directory(dest.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the OS or file system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def resolve_interrupted(path: Path) -> Path:
    """``path``, or — when a writer was killed between its two renames and ``path`` is missing —
    the previous directory it renamed aside (the next writer moves it back)."""
    if path.exists() or path.is_symlink():
        return path
    aside = _leftovers(path, "old")
    return aside[-1] if aside else path


def _clean_up_after_dead_writers(dest: Path) -> None:
    """Under the lock every writer of ``dest`` is dead, so its staging directories are garbage; an
    aside copy is the previous artifact when ``dest`` itself is missing, and garbage otherwise."""
    aside = _leftovers(dest, "old")
    if aside and not dest.exists():
        os.rename(aside.pop(), dest)
    for path in aside + _leftovers(dest, "tmp"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(dest: Path, timeout: float) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``dest``, removed on release. After taking
    the lock, the holder checks that the file is still the one at the path (a releasing holder may
    have unlinked it), so two holders can never both believe they hold it."""
    lock_path = dest.parent / f".{dest.name}.lock"
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _write_error(dest, exc) from exc
        if _try_lock(fd) and same_file(fd, lock_path):
            break
        os.close(fd)
        if time.monotonic() > deadline:
            raise ArtifactError(
                f"another process has been writing {dest} for over {timeout:.0f} s",
                where=str(lock_path),
                hint="wait for it to finish, or write to another path",
            )
        time.sleep(0.02)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def same_file(fd: int, path: Path) -> bool:
    """Is the open descriptor ``fd`` still the file or directory at ``path``?"""
    try:
        on_disk = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _sync_tree(directory: Path) -> None:
    """fsync every file and the directory, so the swap never publishes data still in flight."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_directory(directory)


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, text: str | bytes) -> None:
    """A file of torchkiln's own (in a staging directory or the cache), renamed into place whole."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- reading -------------------------------------------------------------------------------------

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


def check_member_name(name: object, where: str) -> str:
    """A file name from a manifest: a plain name inside the directory, nothing else."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise ArtifactError(
            f"manifest lists the file {name!r}, which is not a plain file name inside the artifact",
            where=where,
            hint="an artifact only lists files of its own directory; rebuild it",
        )
    return name


@contextlib.contextmanager
def open_directory(path: Path) -> Iterator[int]:
    """A descriptor of the directory: every member is opened relative to it, so a directory
    replaced while being read is read consistently (the old one) and can be detected."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ArtifactError(
            f"cannot open {path}: {exc.strerror or exc}", where=str(path), hint="pass an artifact directory"
        ) from exc
    try:
        yield fd
    finally:
        os.close(fd)


#: how deep a JSON file torchkiln reads may nest (a manifest nests under 20; a hostile one 100,000)
MAX_JSON_DEPTH = 200


def parse_json(data: bytes | str, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` of a file's text that never raises a bare RecursionError: deeper than
    ``max_depth`` is an :class:`ArtifactError` naming ``where`` (the parser's recursion stops at the
    interpreter's limit; what it parsed is walked without recursion). ValueError for malformed JSON."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ArtifactError(f"{where}: JSON nested deeper than {max_depth} levels", where=where) from None
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ArtifactError(f"{where}: JSON nested deeper than {max_depth} levels", where=where)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def read_member(directory_fd: int, name: str, where: str, limit: int = 64 << 20) -> bytes:
    """The bytes of a small member (the manifest), refusing links and non-regular files."""
    chunks, size = [], 0
    with _open_member(directory_fd, name, where) as handle:
        while size <= limit:  # in blocks: read(limit) would allocate the whole limit up front
            block = handle.read(1 << 20)
            if not block:
                break
            chunks.append(block)
            size += len(block)
    if size > limit:
        raise ArtifactError(f"{name} is larger than {limit >> 20} MB", where=where)
    return b"".join(chunks)


def copy_verified(directory_fd: int, name: str, digest: str, target: Path, where: str) -> None:
    """Copy member ``name`` to ``target`` while hashing it; :class:`ChecksumMismatch` if the bytes
    are not the ones the manifest lists."""
    hasher = hashlib.sha256()
    with _open_member(directory_fd, name, where) as source, open(target, "xb") as out:
        for block in iter(lambda: source.read(1 << 20), b""):
            hasher.update(block)
            out.write(block)
    if hasher.hexdigest() != digest:
        raise ChecksumMismatch(name)


class ChecksumMismatch(Exception):
    """A member's bytes differ from its manifest checksum."""


@contextlib.contextmanager
def _open_member(directory_fd: int, name: str, where: str) -> Iterator[BinaryIO]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory_fd)
    except FileNotFoundError:
        raise ArtifactError(f"artifact file {name} is missing", where=where, hint="rebuild the artifact") from None
    except OSError as exc:
        reason = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read: {exc.strerror}"
        raise ArtifactError(f"artifact file {name} {reason}", where=where, hint="rebuild the artifact") from None
    handle = os.fdopen(fd, "rb")
    with handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ArtifactError(f"artifact file {name} is not a regular file", where=where)
        yield handle



def private_directory(prefix: str) -> Path:
    """A fresh directory only this user can read (``tempfile.mkdtemp``: mode 0700)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def default_directory() -> Path:
    """``$TORCHKILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/torchkiln``, else ``~/.cache/torchkiln``."""
    explicit = os.environ.get("TORCHKILN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torchkiln"


def names_existing(path: str | os.PathLike[str], kind: str = "any") -> bool:
    """Whether ``path`` names an existing file (``kind="file"``), directory (``"dir"``) or anything: a name no file can have
    (too long: ENAMETOOLONG, which ``Path.exists`` / ``is_file`` raise; a NUL) names nothing, so a
    reader can say "not found" in its own words instead of an internal OSError."""
    try:
        return {"file": Path.is_file, "dir": Path.is_dir}.get(kind, Path.exists)(Path(path))
    except (OSError, ValueError):
        return False
