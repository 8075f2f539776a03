"""Evaluation report rendering: markdown tables per head, confusion-matrix and
reliability-diagram PNGs."""

from __future__ import annotations

from typing import Any

import numpy as np

from mtcls import get_kind
from mtcls.report_text import num
from pipelines.evaluate.statistics import NO_TEMPERATURE


def head_markdown(name: str, rep: dict[str, Any]) -> list[str]:
    """One head's section: headline numbers, classification report, confusion matrix (the kind's layout)."""
    return [f"## {name} ({rep['kind']})", "", *get_kind(rep["kind"]).markdown(name, rep), ""]


def report_markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown, ready to paste into a model card."""
    lines = ["# Evaluation report", "", f"- Model: {report.get('model', {}).get('uri', 'unknown')}",
             f"- Rows: {report['rows']} (not scored: {report['rows_unscored']})", f"- Mean macro F1 over heads: {report['mean_macro_f1'] * 100:.2f}%"]
    if "join" in report:
        j = report["join"]
        lines.append(f"- Join: {j['matched']} matched, {j['predictions_without_labels']} predictions without labels, "
                     f"{j['labels_without_predictions']} labels without predictions")
    for d in report.get("devices", []):
        lines.append(f"- Device: {d['torch']}, precision {d['precision']} ({d.get('precision_reason', '')})")
    lines.append("")
    for name, rep in report["heads"].items():
        lines += head_markdown(name, rep)
    if report.get("calibration"):
        lines += calibration_markdown(report["calibration"])
    if report.get("threshold_tuning"):
        lines += ["## Threshold tuning (F1-maximising, on this data)", "", "| Head | Label | Current | F1 | Tuned | F1 |", "|---|---|---|---|---|---|"]
        for head, t in report["threshold_tuning"].items():
            for i, label in enumerate(t["labels"]):
                cur = t["current_thresholds"][i if len(t["current_thresholds"]) > 1 else 0]
                lines.append(f"| {head} | {label} | {cur:.3f} | {num(t['current_f1'][i])} | {t['thresholds'][i]:.3f} | {num(t['f1'][i])} |")
        lines.append("")
    for col, values in report.get("slices", {}).items():
        lines += [f"## Slices by {col}", "", "| " + col + " | " + " | ".join(f"{h} macro F1" for h in report["heads"]) + " |",
                  "|---" * (len(report["heads"]) + 1) + "|"]
        for value, heads in values.items():
            lines.append(f"| {value} | " + " | ".join(num(heads[h]["macro_f1"]) if h in heads else "-" for h in report["heads"]) + " |")
        lines.append("")
    return "\n".join(lines)


def calibration_markdown(calibration: dict[str, Any]) -> list[str]:
    """The calibration section: per calibratable head its temperature and ECE with and without it."""
    bins = next(iter(calibration.values()))["bins"]
    lines = [f"## Calibration (expected calibration error, {bins} equal-width bins)", "",
             "ECE of the scores as the model outputs them (with the head's calibration: its temperature, after a "
             "log(pos_weight) offset where the column says so) and of the same rows' probabilities without the "
             "calibration; lower is better. Binary and multilabel heads: mean over labels "
             "of the positive-class ECE; single-choice heads: top-label ECE.", "",
             "| Head | Temperature | ECE | ECE without temperature | Reliability diagram |", "|---|---|---|---|---|"]
    for head, c in calibration.items():
        temperature = f"{c['temperature']:.4g}" if c["temperature"] is not None else NO_TEMPERATURE
        if c.get("logit_offset"):
            temperature += " (after the pos_weight offset)"
        if c["temperature"] is None:
            without = "- (same scores)"
        else:
            without = num(c["ece_without_temperature"]) if c["ece_without_temperature"] is not None else c.get("note", "-")
        lines.append(f"| {head} | {temperature} | {num(c['ece']) if c['ece'] is not None else 'no labels'} | {without} | "
                     f"`{head}_reliability.png` |")
    return [*lines, ""]


def plot_reliability(name: str, cal: dict[str, Any], path: str) -> None:
    """Reliability diagram (observed frequency against mean confidence per bin) above the bins' counts,
    for the output scores and, where known, the scores without the temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = cal["bins"]
    edges = np.linspace(0.0, 1.0, bins + 1)
    width = 1.0 / bins
    curves = [("output scores" + (f" (T={cal['temperature']:.3g})" if cal["temperature"] is not None else ""),
               cal["reliability"], cal["ece"], "tab:blue")]
    if cal.get("reliability_without_temperature"):
        curves.append(("without temperature", cal["reliability_without_temperature"], cal["ece_without_temperature"], "tab:orange"))
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(7, 8), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    for k, (label, curve, ece, color) in enumerate(curves):
        x = [c for c in curve["confidence"] if c is not None]
        y = [o for o in curve["observed"] if o is not None]
        ece_text = f"ECE {ece:.4f}" if ece is not None else "no labels"
        ax.plot(x, y, "o-", color=color, label=f"{label}: {ece_text}")
        offset = (k - (len(curves) - 1) / 2) * width / len(curves)
        hist.bar(edges[:-1] + width / 2 + offset, curve["count"], width=width / len(curves), color=color, alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency (accuracy or fraction positive)")
    ax.set_title(f"{name}: reliability" + (f" ({cal['note']})" if cal.get("note") == NO_TEMPERATURE else ""))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    if any(any(curve["count"]) for _, curve, _, _ in curves):
        hist.set_yscale("log")
    hist.set_xlabel("confidence")
    hist.set_ylabel("entries")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(name: str, rep: dict[str, Any], path: str) -> None:
    """Writes raw and row-normalised confusion matrices side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, rows, cols, ylabel, suffix = get_kind(rep["kind"]).plot_matrix(rep)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.55 * max(len(rows), len(cols)) + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size * 0.85))
    for ax, data, title, fmt in ((axes[0], m, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        im = ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("predicted" if ylabel == "true" else "")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {title}{suffix}")
        if len(rows) * len(cols) <= 400:
            hi = data.max() / 2 if data.size else 0
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=8,
                            color="white" if data[i, j] > hi else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
