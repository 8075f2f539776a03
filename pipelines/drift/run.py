"""Reads the manifests of a series of scoring partitions and writes the prediction mix over time.

    <root>/date=2026-11-21/_manifest.json   profile + drift of that night's scoring run
    <root>/date=2026-11-22/_manifest.json
    ...
    -> <output>/drift.csv                    partition, head, part, label, share, psi, flagged
    -> <output>/<head>_drift.png             shares over partitions, flagged partitions marked

Each manifest already holds the partition's exact profile and its PSI against the model's reference
(:mod:`pipelines.score.drift`); this job only lines them up. Partitions are ordered by their value
(ISO dates sort in time order). Every partition must be a complete scoring output (``_SUCCESS``, a
manifest that does not say incomplete); ``allow_incomplete=true`` reads the others anyway and lists
them in the summary. A partition that is a Delta table output has its manifest at
``_mtcls/manifest.json`` and is complete when its ``mtcls.status`` property says so.
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.drift.config import DriftConfig
from pipelines.sink.completion import DELTA_MANIFEST, MANIFEST_FILE, manifest_location, require_complete
from pipelines.storage import InputError, locate, read_json, redact_uri, write_json

log = logging.getLogger(__name__)

COLUMNS = ["partition", "head", "part", "label", "share", "mean_score", "psi", "flagged", "rows", "error_rate", "model"]


def run_drift(cfg: DriftConfig) -> dict[str, Any]:
    """Writes the drift table and one plot per head; returns a summary.

    Raises:
        InputError: The root holds no ``<partition_key>=*/_manifest.json``, a manifest is unreadable,
            or (without ``allow_incomplete``) a partition's scoring output is not complete.
    """
    root = locate(cfg.root)
    manifests, incomplete = _partition_manifests(root, cfg.partition_key, cfg.allow_incomplete)
    rows, skipped = [], []
    for value, manifest in manifests:
        if "profile" not in manifest:
            skipped.append(value)
            continue
        rows += _rows(value, manifest)
    if skipped:
        log.warning("%d partitions have no profile in their manifest (scored with profile=false or an older mtcls): %s",
                    len(skipped), skipped)
    table = pd.DataFrame(rows, columns=COLUMNS)
    out = locate(cfg.output) if cfg.output else root.join("_drift")
    out.fs.makedirs(out.path, exist_ok=True)
    name = f"drift.{cfg.format}"
    with out.fs.open(out.join(name).path, "wb") as fh:
        if cfg.format == "csv":
            fh.write(table.to_csv(index=False).encode())
        else:
            table.to_parquet(fh, index=False)
    plots = []
    with tempfile.TemporaryDirectory() as tmp:
        for head, part in table.groupby("head", sort=False):
            local = str(Path(tmp) / f"{head}_drift.png")
            plot_head(part, head, local)
            out.fs.put(local, out.join(f"{head}_drift.png").path)
            plots.append(out.uri(out.join(f"{head}_drift.png").path))
    flagged = sorted({(r["partition"], r["head"]) for r in rows if r["flagged"]})
    summary = {
        "root": redact_uri(cfg.root),
        "table": redact_uri(out.uri(out.join(name).path)),
        "plots": plots,
        "partitions": [v for v, _ in manifests],
        "partitions_without_profile": skipped,
        "incomplete_partitions": incomplete,
        "flagged": [{"partition": p, "head": h} for p, h in flagged],
    }
    write_json(out.join("drift_summary.json"), summary)
    return summary


def _partition_manifests(root: Any, key: str, allow_incomplete: bool = False) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """The manifests of the partitions, in partition order, and the partitions that are not complete.

    Every ``<key>=*`` directory is a partition, and each must be a complete scoring output
    (:func:`~pipelines.sink.completion.require_complete`); with ``allow_incomplete`` an incomplete
    one is read anyway and one without a manifest is skipped, and both are returned as
    ``{"partition", "problems"}``.
    """
    fs = root.fs
    if not fs.exists(root.path):
        raise InputError(f"scores root {root.uri()!r} does not exist")
    fs.invalidate_cache(root.path)
    partitions = []
    for entry in fs.ls(root.path, detail=True):
        base = posixpath.basename(entry["name"].rstrip("/"))
        if base.startswith(f"{key}=") and entry.get("type") == "directory":
            partitions.append((base[len(key) + 1:], root.join(base)))
    partitions.sort(key=lambda f: f[0])
    manifests = {value: manifest_location(loc) for value, loc in partitions}  # Parquet or Delta outputs
    with_manifest = {value for value, loc in manifests.items() if fs.exists(loc.path)}
    if not with_manifest:
        raise InputError(f"scores root {root.uri()!r} has no partition manifests ({key}=*/{MANIFEST_FILE}, or "
                          f"{key}=*/{DELTA_MANIFEST} of Delta tables)")
    out, incomplete = [], []
    for value, part in partitions:
        problems = require_complete(part, allow_incomplete, "allow_incomplete")
        if problems:
            incomplete.append({"partition": value, "problems": problems})
        if value not in with_manifest:
            continue  # allowed incomplete, but nothing to read
        loc = manifests[value]
        try:
            out.append((value, read_json(loc)))
        except (ValueError, OSError) as exc:
            raise InputError(f"manifest {loc.uri()!r} is unreadable ({type(exc).__name__}: {exc})") from exc
    return out, incomplete


def _rows(value: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    profile, drift = manifest["profile"], manifest.get("drift", {}).get("heads", {})
    model = manifest.get("model", {}).get("weights_sha256")
    rows = []
    for head, summary in profile["heads"].items():
        d = drift.get(head, {})
        common = {"partition": value, "head": head, "mean_score": summary["mean_score"], "psi": d.get("psi"),
                  "flagged": bool(d.get("flagged", False)), "rows": summary["rows"], "error_rate": profile["error_rate"],
                  "model": model}
        for part, label, share in _flatten(summary["prediction_mix"]):
            rows.append({**common, "part": part, "label": label, "share": share})
    return rows


def _flatten(mix: dict[str, Any]) -> list[tuple[str, str, float]]:
    """``{label: share}`` or ``{group: {label: share}}`` -> (part, label, share) rows."""
    out = []
    for key, value in mix.items():
        if isinstance(value, dict):
            out += [(key, label, share) for label, share in value.items()]
        else:
            out.append(("", key, value))
    return out


def plot_head(table: pd.DataFrame, head: str, path: str) -> None:
    """One line per (part, label) share over the partitions; flagged partitions shaded and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = list(dict.fromkeys(table["partition"]))
    x = {p: i for i, p in enumerate(partitions)}
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * len(partitions)), 4.5))
    for (part, label), series in table.groupby(["part", "label"], sort=False):
        ax.plot([x[p] for p in series["partition"]], series["share"], "o-", ms=3, label=f"{part}/{label}" if part else label)
    flagged = table.groupby("partition", sort=False)["flagged"].any()
    psi = table.groupby("partition", sort=False)["psi"].first()
    for p in partitions:
        if flagged[p]:
            ax.axvspan(x[p] - 0.4, x[p] + 0.4, color="tab:red", alpha=0.15)
            ax.annotate(f"PSI {psi[p]:.2f}", (x[p], 1.0), ha="center", va="bottom", fontsize=7, color="tab:red")
    ax.set_xticks(range(len(partitions)), partitions, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of rows (positive rate for multilabel)")
    ax.set_title(f"{head}: prediction mix per partition (red: drift flagged)")
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
