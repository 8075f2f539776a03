"""Model artifacts: localize a model directory, ship it to actors, identify it by hash."""

from __future__ import annotations

import hashlib
import posixpath
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Optional

from mtcls import MultiTaskConfig
from pipelines.storage import InputError, locate


def model_identity(model_dir: Path, uri: str) -> dict[str, Any]:
    """Where the model came from and a hash of its weights (the ``model`` field of metadata)."""
    digest = hashlib.sha256()
    weights = sorted(model_dir.glob("*.safetensors"))
    for w in weights:
        with open(w, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    config = MultiTaskConfig.from_pretrained(model_dir)
    return {
        "uri": uri,
        "weights_sha256": digest.hexdigest(),
        "encoder": config.encoder_name,
        "encoder_type": config.encoder.get("model_type"),
        "heads": [h["name"] for h in config.heads],
    }


_DOWNLOADS: dict[str, "LocalCopy"] = {}


def localize_model(uri: str) -> Path:
    """A local model directory: the path itself, or a copy downloaded once per process (removed at exit)."""
    loc = locate(uri)
    if loc.protocol == "file":
        path = Path(loc.path)
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {uri!r} has no config.json (is it a saved mtcls model?)")
        return path
    if uri in _DOWNLOADS:
        return _DOWNLOADS[uri].path
    if not loc.fs.exists(posixpath.join(loc.path, "config.json")):
        raise InputError(f"model directory {uri!r} has no config.json (is it a saved mtcls model?)")
    copy = LocalCopy({})
    loc.fs.get(loc.path.rstrip("/") + "/", str(copy.path), recursive=True)
    _DOWNLOADS[uri] = copy
    return copy.path


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

    Args:
        model_dir: Local model directory.
        target: Destination directory URI.
        thresholds: ``{head: per-label thresholds}`` written into the copy's head specs.
    """
    from transformers import AutoTokenizer

    from mtcls import MultiTaskModel

    model = MultiTaskModel.from_pretrained(model_dir)
    for head, values in (thresholds or {}).items():
        spec = model.specs[head]
        model.set_head_spec(spec.impl.with_thresholds(spec, values))
    loc = locate(target)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        loc.fs.makedirs(loc.path, exist_ok=True)
        for f in Path(tmp).iterdir():
            loc.fs.put(str(f), posixpath.join(loc.path, f.name))
