"""Evaluation report rendering: markdown tables in the model cards' layout, confusion-matrix PNGs."""

from __future__ import annotations

from typing import Any

import numpy as np


def _f(x: float) -> str:
    return f"{x:.4f}"


def _class_table(rep: dict[str, Any]) -> list[str]:
    lines = ["| Class | Precision | Recall | F1-Score | Support |", "|---|---|---|---|---|"]
    for name, row in rep["per_label"].items():
        lines.append(f"| {name} | {_f(row['precision'])} | {_f(row['recall'])} | {_f(row['f1'])} | {row['support']} |")
    for avg in ("macro", "weighted"):
        a = rep[avg]
        lines.append(f"| {avg.capitalize()} Avg | {_f(a['precision'])} | {_f(a['recall'])} | {_f(a['f1'])} | {rep['support']} |")
    return lines


def _confusion_table(labels: list[str], cm: list[list[int]]) -> list[str]:
    lines = ["| Actual \\ Predicted | " + " | ".join(f"Predicted {l}" for l in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for label, row in zip(labels, cm):
        lines.append(f"| Actual {label} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def head_markdown(name: str, rep: dict[str, Any]) -> list[str]:
    """One head's section: headline numbers, classification report, confusion matrix."""
    kind = rep["kind"]
    out = [f"## {name} ({kind})", ""]
    if kind in ("binary", "multiclass", "distribution"):
        out += [f"- Accuracy: {rep['accuracy'] * 100:.2f}%", f"- Macro F1: {rep['macro']['f1'] * 100:.2f}%",
                f"- Rows labelled: {rep['rows_labelled']}, without label: {rep['rows_unlabelled']}, label outside the head's set: {rep['rows_invalid']}"]
        if kind == "distribution":
            out += [f"- KL divergence (mean): {rep['kl_divergence']:.4f}", f"- Top-1 accuracy: {rep['top1_accuracy']:.4f}",
                    f"- Cumulative threshold {rep['cumulative_threshold']}: mean set size {rep['mean_set_size']:.3f}, "
                    f"true label in set {rep['set_coverage'] * 100:.2f}%"]
        out += ["", "Classification report:", "", *_class_table(rep), "", "Confusion matrix:", "", *_confusion_table(rep["labels"], rep["confusion_matrix"])]
    elif kind == "multilabel":
        out += [f"- Subset accuracy: {rep['subset_accuracy'] * 100:.2f}%", f"- Hamming loss: {rep['hamming_loss']:.4f}",
                f"- Micro F1: {rep['micro']['f1'] * 100:.2f}%", f"- Macro F1: {rep['macro']['f1'] * 100:.2f}%",
                f"- Rows labelled: {rep['rows_labelled']}, without label: {rep['rows_unlabelled']}, label outside the head's set: {rep['rows_invalid']}",
                "", "Per label:", "", *_class_table(rep)]
    else:
        out += [f"- Overall accuracy: {rep['overall']['accuracy'] * 100:.2f}%", f"- Overall macro F1: {rep['overall']['macro']['f1'] * 100:.2f}%",
                f"- Mean per-group macro F1: {rep['mean_group_macro_f1'] * 100:.2f}%", "",
                "| Group | F1 Score (weighted) | Macro F1 | Accuracy | Rows |", "|---|---|---|---|---|"]
        for g, grep in rep["groups"].items():
            out.append(f"| {g} | {_f(grep['weighted']['f1'])} | {_f(grep['macro']['f1'])} | {_f(grep['accuracy'])} | {rep['rows_labelled'][g]} |")
        out += ["", "Overall classification report:", "", *_class_table(rep["overall"]), "", "Overall confusion matrix:", "",
                *_confusion_table(rep["labels"], rep["overall"]["confusion_matrix"])]
    return out + [""]


def report_markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown, ready to paste into a model card."""
    lines = ["# Evaluation report", "", f"- Model: {report.get('model', {}).get('uri', 'unknown')}",
             f"- Rows: {report['rows']} (not scored: {report['rows_unscored']})", f"- Mean macro F1 over heads: {report['mean_macro_f1'] * 100:.2f}%"]
    if "join" in report:
        j = report["join"]
        lines.append(f"- Join: {j['matched']} matched, {j['predictions_without_labels']} predictions without labels, "
                     f"{j['labels_without_predictions']} labels without predictions")
    lines.append("")
    for name, rep in report["heads"].items():
        lines += head_markdown(name, rep)
    if report.get("threshold_tuning"):
        lines += ["## Threshold tuning (F1-maximising, on this data)", "", "| Head | Label | Current | F1 | Tuned | F1 |", "|---|---|---|---|---|---|"]
        for head, t in report["threshold_tuning"].items():
            for i, label in enumerate(t["labels"]):
                cur = t["current_thresholds"][i if len(t["current_thresholds"]) > 1 else 0]
                lines.append(f"| {head} | {label} | {cur:.3f} | {_f(t['current_f1'][i])} | {t['thresholds'][i]:.3f} | {_f(t['f1'][i])} |")
        lines.append("")
    for col, values in report.get("slices", {}).items():
        lines += [f"## Slices by {col}", "", "| " + col + " | " + " | ".join(f"{h} macro F1" for h in report["heads"]) + " |",
                  "|---" * (len(report["heads"]) + 1) + "|"]
        for value, heads in values.items():
            lines.append(f"| {value} | " + " | ".join(_f(heads[h]["macro_f1"]) if h in heads else "-" for h in report["heads"]) + " |")
        lines.append("")
    return "\n".join(lines)


def _matrix_for_plot(rep: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str], str]:
    kind = rep["kind"]
    if kind == "multilabel":
        cols = ["TP", "FN", "FP", "TN"]
        m = np.array([[row["tp"], row["fn"], row["fp"], row["tn"]] for row in rep["per_label"].values()])
        return m, list(rep["per_label"]), cols, "label"
    cm = rep["overall"]["confusion_matrix"] if kind == "grouped" else rep["confusion_matrix"]
    return np.array(cm), rep["labels"], rep["labels"], "true"


def plot_confusion(name: str, rep: dict[str, Any], path: str) -> None:
    """Writes raw and row-normalised confusion matrices side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, rows, cols, ylabel = _matrix_for_plot(rep)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.55 * max(len(rows), len(cols)) + 3)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size * 0.85))
    for ax, data, title, fmt in ((axes[0], m, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        im = ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("predicted" if ylabel == "true" else "")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {title}" + (" (all groups)" if rep["kind"] == "grouped" else ""))
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
