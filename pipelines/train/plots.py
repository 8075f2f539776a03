"""Training plots: loss and validation macro-F1 per epoch, one PNG per head."""

from __future__ import annotations

from typing import Any


def plot_history(history: list[dict[str, Any]], head: str, path: str) -> None:
    """Training loss and validation macro-F1 per epoch for one head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h[f"{head}_train_loss"] for h in history], "o-", label="train loss", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h[f"{head}_macro_f1"] for h in history], "s-", label="validation macro-F1", color="tab:blue")
    if f"{head}_tuned_macro_f1" in history[0]:
        ax2.plot(epochs, [h[f"{head}_tuned_macro_f1"] for h in history], "^--", label="at tuned thresholds", color="tab:green")
    ax2.set_ylabel("validation macro-F1")
    ax2.set_ylim(0, 1)
    ax.set_title(head)
    fig.legend(loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
