"""The scoring output's prediction profile and its drift against the model's reference profile.

Each output file carries the profile of its rows (written by :func:`pipelines.sink.write.write_units`);
:meth:`pipelines.sink.parquet.ParquetSink.verify` merges those of the files it keeps, so the
manifest's ``profile`` describes exactly the rows in the output, across reruns. ``drift``
compares it with ``reference_profile.json`` of the model (:mod:`mtcls.profile`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from mtcls import HeadSpec
from mtcls.profile import DEFAULT_DRIFT_MIN_ROWS, drift_report, summarize
from pipelines.runtime import JobAlert
from pipelines.sink.base import Verification

log = logging.getLogger(__name__)


class DriftDetected(JobAlert):
    """``fail_on_drift=true`` and at least one head's prediction mix drifted (raised after ``_SUCCESS``)."""


def profile_section(specs: list[HeadSpec], verification: Verification) -> dict[str, Any]:
    """The manifest's ``profile``: row, error and truncation rates, and each head's summarized profile."""
    rows = verification.rows_out
    return {
        "rows": rows,
        "error_rate": round(verification.rows_error / rows, 6) if rows else None,
        "truncated_rate": round(verification.rows_truncated / rows, 6) if rows else None,
        "rows_without_profile": verification.rows_unprofiled,
        "heads": {s.name: summarize(s, verification.profile[s.name]) for s in specs if s.name in verification.profile},
    }


def drift_section(specs: list[HeadSpec], verification: Verification, reference: Optional[dict[str, Any]],
                  threshold: float, model_uri: str, min_rows: int = DEFAULT_DRIFT_MIN_ROWS) -> dict[str, Any]:
    """The manifest's ``drift``, with a warning logged per flagged head (or once when the model has no reference).

    Heads with fewer than ``min_rows`` rows scored or in the reference are reported, not flagged
    (:func:`mtcls.profile.head_drift`).
    """
    if reference is None:
        log.warning("model %s has no reference profile (trained before mtcls stored one): drift is not measured; "
                    "retrain it to get one", model_uri)
        return {**drift_report(specs, verification.profile, None, threshold, min_rows),
                "note": "the model has no reference profile (reference_profile.json)"}
    report = drift_report(specs, verification.profile, reference["heads"], threshold, min_rows)
    report["reference_source"] = reference.get("source")
    if verification.rows_unprofiled:
        report["note"] = f"{verification.rows_unprofiled} rows were written without a profile and are not in it"
    for name in report["flagged"]:
        head = report["heads"][name]
        where = f" (worst: {head['worst_part']})" if head["worst_part"] else ""
        log.warning("drift: head %r: PSI %.3f of its prediction mix against the model's reference exceeds %.3f%s",
                    name, head["psi"], threshold, where)
    return report


def raise_on_drift(drift: dict[str, Any], output_uri: str) -> None:
    """Raises :class:`DriftDetected` naming the flagged heads and their PSI."""
    if drift.get("flagged"):
        heads = ", ".join(f"{n} (PSI {drift['heads'][n]['psi']:.3f})" for n in drift["flagged"])
        raise DriftDetected(f"prediction drift above {drift['threshold']} on {heads}; the output {output_uri} is "
                            "complete (_SUCCESS written); see the manifest's 'drift'")
