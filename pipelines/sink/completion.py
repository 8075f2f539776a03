"""Whether a scoring output is complete, for the jobs that read one (evaluation, drift).

The scoring job writes ``_manifest.json`` at the end of every run and ``_SUCCESS`` last, only when
every input row is in the output once; its manifest's ``status`` is ``complete`` or
``incomplete``. A Delta table output records the same in its table property ``mtcls.status``,
set in the commit that ends a complete run (:mod:`pipelines.sink.delta`). A reader of an output that lacks either reports on part of the data without
knowing it, so :func:`require_complete` refuses it unless the job's override key says to read it
anyway.
"""

from __future__ import annotations

import json
import logging

from pipelines.storage import InputError, Location, redact_uri

log = logging.getLogger(__name__)

#: The completion marker, written last by the scoring job.
SUCCESS_FILE = "_SUCCESS"
#: The manifest of the output's last run.
MANIFEST_FILE = "_manifest.json"
#: A Delta table output's property that says ``complete`` or ``incomplete`` (its ``_SUCCESS``).
PROP_STATUS = "mtcls.status"
#: A Delta table output's property holding the ``mtcls`` metadata (heads, model) that data files'
#: footers also carry; compaction drops those footers.
PROP_METADATA = "mtcls.metadata"


#: Where a Delta table output keeps its last run's manifest, under the table.
DELTA_MANIFEST = "_mtcls/manifest.json"


def manifest_location(loc: Location) -> Location:
    """The manifest of the scoring output at ``loc``: ``_manifest.json`` of a Parquet directory,
    ``_mtcls/manifest.json`` of a Delta table."""
    from pipelines.sources import is_delta_table

    return loc.join(DELTA_MANIFEST if is_delta_table(loc) else MANIFEST_FILE)


def completion_problems(loc: Location) -> list[str]:
    """What shows that the scoring output at ``loc`` is not complete (an empty list: nothing).

    Checks that ``_manifest.json`` exists, is readable, and does not say ``"status"`` other than
    ``"complete"`` (a manifest without a status, written by an older mtcls, relies on
    ``_SUCCESS``), and that ``_SUCCESS`` exists. A Delta table output: that its latest version's
    ``mtcls.status`` property says ``complete``.
    """
    from pipelines.sources import is_delta_table

    if is_delta_table(loc):
        status = _delta_properties(loc).get(PROP_STATUS)
        return [] if status == "complete" else [f"its table property {PROP_STATUS} is {json.dumps(status)}"]
    fs = loc.fs
    try:
        fs.invalidate_cache(loc.path)  # object stores cache listings; a marker may have just appeared or gone
    except Exception:  # noqa: BLE001 - a filesystem without a cache has nothing to invalidate
        pass
    problems = []
    manifest = loc.join(MANIFEST_FILE)
    if not fs.exists(manifest.path):
        problems.append(f"no {MANIFEST_FILE} (the scoring job writes it at the end of every run)")
    else:
        try:
            with fs.open(manifest.path, "r") as fh:
                status = json.load(fh).get("status")
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"its {MANIFEST_FILE} is unreadable ({type(exc).__name__}: {exc})")
        else:
            if status is not None and status != "complete":
                problems.append(f"its {MANIFEST_FILE} says \"status\": {json.dumps(status)}")
    if not fs.exists(loc.join(SUCCESS_FILE).path):
        problems.append(f"no {SUCCESS_FILE} (written last, only when every input row is in the output)")
    return problems


def require_complete(loc: Location, allow_incomplete: bool, key: str) -> list[str]:
    """Refuses a scoring output that is not complete, unless ``allow_incomplete``.

    Args:
        loc: The scoring output directory.
        allow_incomplete: Read it anyway: the problems are logged as a warning and returned, for
            the caller to record in its report.
        key: The config key that sets ``allow_incomplete`` (named in the error).

    Returns:
        The problems (:func:`completion_problems`); empty when the output is complete.

    Raises:
        InputError: Naming the output (credentials removed), what is wrong, and ``key``.
    """
    problems = completion_problems(loc)
    if not problems:
        return []
    uri = redact_uri(loc.uri())
    if not allow_incomplete:
        raise InputError(f"scoring output {uri!r} is not complete: {'; '.join(problems)}. Reading it would report on "
                         f"part of the rows; complete it (run jobs.score on it again) or set {key}=true to read it anyway")
    log.warning("scoring output %r is not complete (%s); reading it anyway (%s=true)", uri, "; ".join(problems), key)
    return problems


def delta_output_metadata(loc: Location) -> dict:
    """The ``mtcls`` metadata of a Delta table scoring output (heads, model), from its table
    properties: compaction rewrites data files without the footers that carry it.

    Raises:
        InputError: The table was not written by the scoring job.
    """
    raw = _delta_properties(loc).get(PROP_METADATA)
    if raw is None:
        raise InputError(f"Delta table {redact_uri(loc.uri())!r} has no {PROP_METADATA} property: is it the output of jobs.score?")
    return json.loads(raw)


def _delta_properties(loc: Location) -> dict:
    from deltalake import DeltaTable

    from pipelines.storage import delta_storage_options

    return dict(DeltaTable(loc.uri(), storage_options=delta_storage_options(loc)).metadata().configuration)
