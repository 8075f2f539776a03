"""Where an output may be: never on, above or inside its input, however either is spelled.

Both sides are compared in canonical form: a local path with ``..``, symlinks, ``file://`` and
relative spellings resolved (:func:`os.path.realpath`, which also resolves the existing part of a
path that does not exist yet), an object-store URI as its protocol family and ``bucket/key``
(``s3``, ``s3a`` and ``s3n`` are one store; so are ``gs`` and ``gcs``).
"""

from __future__ import annotations

import os

from pipelines.config import ConfigError
from pipelines.storage import Location, redact_uri

_FAMILIES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfss": "abfs", "az": "abfs"}


def canonical(loc: Location) -> tuple[str, str]:
    """``(store, path)``: the protocol family and the resolved path (local) or ``bucket/key``."""
    if loc.protocol == "file":
        return "file", os.path.realpath(loc.path)
    return _FAMILIES.get(loc.protocol, loc.protocol), loc.path.strip("/")


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/") or outer in ("", "/")


def check_apart(in_loc: Location, out_loc: Location) -> None:
    """Refuses an output that equals the input, contains it, or lies inside it.

    Raises:
        ConfigError: Naming ``output``, both locations and their resolved forms.
    """
    (in_store, in_path), (out_store, out_path) = canonical(in_loc), canonical(out_loc)
    if in_store != out_store:
        return
    if _within(out_path, in_path) or _within(in_path, out_path):
        how = "is" if in_path == out_path else "lies inside" if _within(out_path, in_path) else "contains"
        raise ConfigError(
            f"key 'output': {redact_uri(out_loc.uri())!r} {how} the input {redact_uri(in_loc.uri())!r} "
            f"(resolved: output {out_path!r}, input {in_path!r}); a job never writes into, over or around what it reads: "
            "choose an output apart from the input"
        )
