"""The sink interface: what a run composes to write its output exactly once.

    sink.open(overwrite)          refuse a foreign output, take the lease, clear on overwrite
    sink.resume(units, inputs)    mark the rows already committed; drop files of changed inputs
    sink.write_stage(...)         the Ray Data function that writes (and, for files, commits) blocks
    sink.commit(written)          the driver's commit of what the write stage reported
    sink.verify(inputs, checksum) prove from storage that every input row is there once
    sink.finish(manifest, ver)    the manifest, and the completion marker only if verification passed

A backend owns its layout and its commit protocol; runs only call these methods.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from mtcls.profile import Profile
from pipelines.sink.units import InputFile, Unit


@dataclass
class Committed:
    """One committed output file and what its footer says."""

    name: str
    rows: int
    commit: dict[str, Any]
    #: What the file's rows mean: its columns and the model that scored them.
    layout: dict[str, str] = field(default_factory=dict)

    @property
    def ranges(self) -> list[list[int]]:
        return self.commit["ranges"]

    @property
    def source(self) -> tuple[str, str]:
        """The input file and version it holds rows of."""
        return self.commit["input"], self.commit["fingerprint"]


@dataclass(frozen=True)
class Problem:
    """Something verification found wrong, and where: an input file (its URI) or an output file (its name)."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Verification:
    """What :meth:`Sink.verify` found in storage."""

    files: list[Committed] = field(default_factory=list)
    rows_out: int = 0
    rows_error: int = 0
    rows_truncated: int = 0
    duplicates_removed: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: The merged prediction profile of the files that carry one (:mod:`mtcls.profile`).
    profile: Profile = field(default_factory=dict)
    #: Rows of files committed without a profile.
    rows_unprofiled: int = 0
    #: Ids of the input that are null, and that repeat within one input file.
    null_ids: int = 0
    duplicate_ids: int = 0


@dataclass
class Resume:
    """What :meth:`Sink.resume` found: the committed files kept, and the stale ones removed."""

    kept: list[Committed]
    stale: list[str]


#: ``f([(filesystem, path)]) -> [IdCount]`` reading ids back from storage (a Ray fan-out in a job).
Checksums = Callable[[list[tuple[Any, str]]], list[Any]]


class Sink(abc.ABC):
    """An exactly-once output."""

    @abc.abstractmethod
    def open(self, overwrite: bool, inputs: dict[str, InputFile] | None = None) -> contextlib.AbstractContextManager:
        """Checks the output is this job's to write (given ``inputs``, also that it holds no rows of
        inputs no longer listed), takes its lease and prepares it (a context)."""

    @abc.abstractmethod
    def resume(self, units: list[Unit], inputs: dict[str, InputFile]) -> Resume:
        """Fills each unit's ``done`` ranges from what is committed."""

    @abc.abstractmethod
    def write_stage(self, units: list[Unit], inputs: dict[str, InputFile], schema: pa.Schema,
                    profile_heads: list[dict] | None) -> tuple[Callable[..., pa.Table], dict[str, Any]]:
        """The write stage for ``map_batches`` and its keyword arguments."""

    @abc.abstractmethod
    def commit(self, written: pa.Table) -> None:
        """Commits what one write-stage batch reported (files commit themselves: nothing to do)."""

    @abc.abstractmethod
    def verify(self, inputs: dict[str, InputFile], checksums: Checksums) -> Verification:
        """Proves from storage that every input row is in the output exactly once."""

    @abc.abstractmethod
    def finish(self, manifest: dict[str, Any], verification: Verification) -> None:
        """Writes the manifest; marks the output complete only if verification passed."""

    def iter_commits(self, batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
        """Commits each write-stage batch as it reaches the driver, and passes it on."""
        for batch in batches:
            self.commit(batch)
            yield batch


def missing_inputs(files: list[Committed], inputs: dict[str, InputFile], prune_missing: bool, uri: str) -> list[str]:
    """The input files that committed files hold rows of but the input no longer lists.

    Args:
        files: The committed files (or records) of the output.
        inputs: The input files by path.
        prune_missing: Whether such rows may be removed (otherwise they are refused).
        uri: The output, for the message.

    Raises:
        InputError: Naming those input files and the keys that remove their rows, unless ``prune_missing``.
    """
    from pipelines.storage import InputError, redact_uri

    listed = {f.uri for f in inputs.values()}
    missing = sorted({f.commit["input"] for f in files if f.commit["input"] not in listed})
    if missing and not prune_missing:
        rows = sum(f.rows for f in files if f.commit["input"] not in listed)
        shown = ", ".join(repr(redact_uri(m)) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(
            f"output {redact_uri(uri)!r} holds {rows} committed rows of {len(missing)} input file(s) that the "
            f"input no longer lists: {shown}. Nothing was changed. Point input at the same files as before, or rerun with "
            "prune_missing=true to remove those rows (overwrite=true removes everything)"
        )
    return missing


def mark_done(units: list[Unit], kept: list[Committed], inputs: dict[str, InputFile]) -> None:
    """Sets each unit's ``done`` ranges to the rows of its input file that ``kept`` files hold."""
    from pipelines.sink.cover import merge_ranges

    current = {(f.uri, f.fingerprint): path for path, f in inputs.items()}
    done: dict[str, list[list[int]]] = {}
    for f in kept:
        done.setdefault(current[f.source], []).extend(f.ranges)
    for u in units:
        end = u.first_row + u.rows
        u.done = [[max(a, u.first_row), min(b, end)] for a, b in merge_ranges(done.get(u.path, [])) if a < end and b > u.first_row]
