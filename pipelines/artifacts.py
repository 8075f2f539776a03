"""Model artifacts: localize a model directory, ship it to actors, identify it by hash, publish it whole.

A model directory is replaced as a whole (:func:`publish_model_dir`): on local disk the new
directory is written beside the target and swapped in with one ``renameat2(RENAME_EXCHANGE)``, so
a reader sees the whole old model or the whole new one, and no file of the earlier model stays.
Readers take a snapshot (:func:`localize_model`): every file of one directory, linked or copied
into a private directory, so a job's several reads (config, weights, tokenizer) all come from the
same model even when an export swaps the directory meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import posixpath
import shutil
import stat
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Optional

from mtcls import MultiTaskConfig
from pipelines.storage import InputError, locate, redact_uri

log = logging.getLogger(__name__)

#: How long a loader waits for a local model directory that is absent, or changes while it is read,
#: before it fails (an export without an atomic swap leaves the target absent for an instant).
SWAP_WAIT_S = 2.0


def model_identity(model_dir: Path, uri: str) -> dict[str, Any]:
    """Where the model came from (credentials removed) and a hash of its weights (the ``model`` field of metadata)."""
    digest = hashlib.sha256()
    weights = sorted(model_dir.glob("*.safetensors"))
    for w in weights:
        with open(w, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    config = MultiTaskConfig.from_pretrained(model_dir)
    return {
        "uri": redact_uri(uri),
        "weights_sha256": digest.hexdigest(),
        "encoder": config.encoder_name,
        "encoder_type": config.encoder.get("model_type"),
        "heads": [h["name"] for h in config.heads],
    }


_DOWNLOADS: dict[str, "LocalCopy"] = {}
#: Local snapshots by directory: (what the directory held, the snapshot). Replaced snapshots stay
#: in ``_OLD_SNAPSHOTS`` until the process exits, since a running job may still read one.
_SNAPSHOTS: dict[str, tuple[tuple, "LocalCopy"]] = {}
_OLD_SNAPSHOTS: list["LocalCopy"] = []


def localize_model(uri: str) -> Path:
    """A local model directory that does not change while the job reads it.

    Local directories: a snapshot of every file of the directory as one directory held them (hard
    links where the temporary directory is on the same filesystem, copies otherwise), taken again
    only when the directory changed. Other URIs: a copy downloaded once per process. Both are
    removed at exit.

    Raises:
        InputError: When the directory has no ``config.json``.
    """
    loc = locate(uri)
    if loc.protocol == "file":
        return _local_snapshot(Path(loc.path), uri)
    if uri in _DOWNLOADS:
        return _DOWNLOADS[uri].path
    if not loc.fs.exists(posixpath.join(loc.path, "config.json")):
        raise InputError(f"model directory {redact_uri(uri)!r} has no config.json (is it a saved mtcls model?)")
    copy = LocalCopy({})
    loc.fs.get(loc.path.rstrip("/") + "/", str(copy.path), recursive=True)
    _DOWNLOADS[uri] = copy
    return copy.path


def _local_snapshot(path: Path, uri: str) -> Path:
    """:func:`localize_model` for a local directory: retried while an export swaps it."""
    missing = f"model directory {uri!r} has no config.json (is it a saved mtcls model?)"
    deadline = time.monotonic() + SWAP_WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            fd = None
        except NotADirectoryError:
            raise InputError(missing) from None
        if fd is not None:
            try:
                snapshot = _snapshot(fd, path, missing)
            finally:
                os.close(fd)
            if snapshot is not None:
                return snapshot
        if time.monotonic() >= deadline:
            if fd is None:
                raise InputError(missing)
            raise InputError(f"model directory {uri!r} kept changing while it was read (an export replacing it?); retry")
        time.sleep(0.02)


def _same_directory(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the directory open as ``fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    pinned = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (pinned.st_dev, pinned.st_ino)


def _snapshot(fd: int, path: Path, missing: str) -> Optional[Path]:
    """Every regular file of the open directory ``fd`` in a private directory; None if it was swapped meanwhile.

    Only names are read through ``fd``, so every file comes from the one directory it holds. If
    ``path`` still names that directory once the files are linked, no export replaced it during
    the snapshot (an export only removes files from a directory it has swapped away).
    """
    files: dict[str, os.stat_result] = {}
    for name in sorted(os.listdir(fd)):
        try:
            st = os.stat(name, dir_fd=fd)
        except FileNotFoundError:
            return None  # removed while listed: this directory is an old one being deleted
        if stat.S_ISREG(st.st_mode):
            files[name] = st
    if "config.json" not in files:
        if _same_directory(fd, path):
            raise InputError(missing)
        return None
    pinned = os.fstat(fd)
    signature = (pinned.st_dev, pinned.st_ino, tuple((n, s.st_ino, s.st_size, s.st_mtime_ns) for n, s in files.items()))
    key = os.path.realpath(path)
    known = _SNAPSHOTS.get(key)
    if known is not None and known[0] == signature and known[1].path.is_dir():
        return known[1].path if _same_directory(fd, path) else None
    copy = LocalCopy({})
    try:
        for name in files:
            _link_or_copy(fd, name, copy.path / name)
    except FileNotFoundError:
        copy.remove()
        return None
    if not _same_directory(fd, path):
        copy.remove()
        return None
    if known is not None:
        _OLD_SNAPSHOTS.append(known[1])
    _SNAPSHOTS[key] = (signature, copy)
    return copy.path


def _link_or_copy(fd: int, name: str, target: Path) -> None:
    try:
        os.link(name, target, src_dir_fd=fd)
        return
    except FileNotFoundError:
        raise
    except (OSError, NotImplementedError):
        pass  # another filesystem, or hard links not permitted: copy
    source = os.open(name, os.O_RDONLY, dir_fd=fd)
    with os.fdopen(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def read_model_files(model_dir: Path) -> dict[str, bytes]:
    """The files of a model directory, to ship to actors through the object store."""
    return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


class LocalCopy:
    """A temporary local model directory, removed when this object is collected or the process exits.

    Args:
        files: ``{file name: bytes}`` from :func:`read_model_files` (empty: an empty directory).
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="mtcls-model-"))
        for name, data in files.items():
            (self.path / name).write_bytes(data)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), ignore_errors=True)

    def remove(self) -> None:
        """Deletes the directory now."""
        self._cleanup()


def export_model(model_dir: Path, target: str, thresholds: Optional[dict[str, list[float]]] = None) -> None:
    """Copies a saved model (and its tokenizer) to any URI, optionally with new decision thresholds.

    The copy replaces what ``target`` holds as a whole (:func:`publish_model_dir`).

    Args:
        model_dir: Local model directory.
        target: Destination directory URI.
        thresholds: ``{head: per-label thresholds}`` written into the copy's head specs.

    Raises:
        InputError: When ``target`` exists and is not an mtcls model directory.
    """
    from transformers import AutoTokenizer

    from mtcls import MultiTaskModel

    check_model_target(target)
    model = MultiTaskModel.from_pretrained(model_dir)
    for head, values in (thresholds or {}).items():
        spec = model.specs[head]
        model.set_head_spec(spec.impl.with_thresholds(spec, values))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        publish_model_dir(Path(tmp), target)


# ---------------------------------------------------------------------------------- publishing

def check_model_target(target: str) -> None:
    """Refuses a target directory that mtcls may not replace.

    A target may be replaced when it does not exist, is an empty directory, or is an mtcls model
    directory: files only (no subdirectory), among them a ``config.json`` whose ``model_type`` is
    ``mtcls``. Anything else may hold someone's files, and publishing would delete them.

    Raises:
        InputError: Naming the target and what it holds.
    """
    loc = locate(target)
    fs, path = loc.fs, loc.path
    name = redact_uri(target)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise InputError(f"model output {name!r} is a file, not a model directory; choose another output")
    entries = fs.ls(path, detail=True)
    if not entries:
        return
    dirs = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")
    refuse = (f"model output {name!r} exists and is not an mtcls model directory, so it is not replaced "
              "(publishing a model deletes every file of the directory it replaces): ")
    if dirs:
        raise InputError(refuse + f"it holds directories {dirs[:5]}; choose an empty or new output directory")
    config = posixpath.join(path, "config.json")
    try:
        with fs.open(config, "r") as fh:
            model_type = json.load(fh).get("model_type")
    except FileNotFoundError:
        raise InputError(refuse + "it has files but no config.json; choose an empty or new output directory") from None
    except (ValueError, AttributeError, OSError) as exc:
        raise InputError(refuse + f"its config.json is unreadable ({type(exc).__name__})") from exc
    if model_type != MultiTaskConfig.model_type:
        raise InputError(refuse + f"its config.json has model_type {model_type!r}, not {MultiTaskConfig.model_type!r}")


def publish_model_dir(source: Path, target: str) -> None:
    """Puts the files of a complete local directory at ``target``, replacing what it held as a whole.

    Local disk: the files are written (and synced) into a staging directory beside the target,
    which is then swapped with the target by ``renameat2(RENAME_EXCHANGE)`` (Linux), one atomic
    step: a reader sees the old directory or the new one, never a mix; the old one is then
    deleted. Where that call is missing or unsupported by the filesystem, the old directory is
    renamed away and the new one renamed in (readers, :func:`localize_model`, wait out the
    instant between). A symlinked target is replaced where the link points.

    Object stores (any other fsspec URI) have no atomic directory rename; best effort:
    ``config.json`` is removed first (a loader then finds no model, rather than a mixed one), every
    other file is uploaded, ``config.json`` last, then the files of the earlier model that the new
    one does not have are deleted. A reader that is downloading while this runs can still get a
    mix.

    Args:
        source: Local directory of regular files (no subdirectories).
        target: Destination directory URI.

    Raises:
        InputError: When ``target`` exists and is not an mtcls model directory (:func:`check_model_target`).
    """
    check_model_target(target)
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    loc = locate(target)
    if loc.protocol == "file":
        _publish_local(source, names, Path(os.path.realpath(loc.path)))
    else:
        _publish_remote(source, names, loc)


def _publish_local(source: Path, names: list[str], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.mtcls-staging-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)  # the umask's permissions, as a directory the training job made itself
    try:
        for name in names:
            shutil.copyfile(source / name, staging / name)
            _fsync(staging / name)
        _fsync(staging)
        try:
            os.rename(staging, dest)  # no target yet (or an empty one): the staging directory becomes it
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            _swap_in(staging, dest)
        _fsync(dest.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the earlier model


def _swap_in(staging: Path, dest: Path) -> None:
    """Makes ``staging`` the directory at ``dest``; the earlier directory ends up at ``staging``."""
    try:
        rename_exchange(staging, dest)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        log.debug("atomic directory exchange unavailable (%s); renaming the old model away first", exc)
    old = dest.with_name(f".{dest.name}.mtcls-old-{uuid.uuid4().hex[:12]}")
    os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except OSError:
        os.rename(old, dest)  # put the earlier model back
        raise
    os.rename(old, staging)


def rename_exchange(a: Path, b: Path) -> None:
    """Swaps two paths atomically: ``renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)``.

    Raises:
        OSError: ``ENOSYS`` where the C library has no ``renameat2`` (not Linux, or glibc before
            2.28), ``EINVAL`` where the filesystem cannot exchange, or the call's own error.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError, TypeError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    at_fdcwd, rename_exchange_flag = -100, 2
    if call(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange_flag) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


def _publish_remote(source: Path, names: list[str], loc: Any) -> None:
    fs, root = loc.fs, loc.path
    config = posixpath.join(root, "config.json")
    before = set()
    if fs.exists(root):
        fs.invalidate_cache(root)
        before = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
        if "config.json" in before:
            fs.rm(config)
    fs.makedirs(root, exist_ok=True)
    for name in names:
        if name != "config.json":
            fs.put(str(source / name), posixpath.join(root, name))
    if "config.json" in names:
        fs.put(str(source / "config.json"), config)
    for name in sorted(before - set(names)):
        fs.rm(posixpath.join(root, name))
