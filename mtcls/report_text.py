"""Markdown building blocks for evaluation reports (per-head tables: per-label precision, recall, F1, support, confusion matrix)."""

from __future__ import annotations

from typing import Any


def num(x: float) -> str:
    """A metric with four decimals."""
    return f"{x:.4f}"


def pct(x: float) -> str:
    """A share as a percentage with two decimals."""
    return f"{x * 100:.2f}%"


def class_table(rep: dict[str, Any]) -> list[str]:
    """Per-label precision/recall/F1/support, then macro and weighted averages."""
    lines = ["| Class | Precision | Recall | F1-Score | Support |", "|---|---|---|---|---|"]
    for name, row in rep["per_label"].items():
        lines.append(f"| {name} | {num(row['precision'])} | {num(row['recall'])} | {num(row['f1'])} | {row['support']} |")
    for avg in ("macro", "weighted"):
        a = rep[avg]
        lines.append(f"| {avg.capitalize()} Avg | {num(a['precision'])} | {num(a['recall'])} | {num(a['f1'])} | {rep['support']} |")
    return lines


def confusion_table(labels: list[str], cm: list[list[int]]) -> list[str]:
    """A confusion matrix as a markdown table (rows: actual, columns: predicted)."""
    lines = ["| Actual \\ Predicted | " + " | ".join(f"Predicted {l}" for l in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for label, row in zip(labels, cm):
        lines.append(f"| Actual {label} | " + " | ".join(str(v) for v in row) + " |")
    return lines
