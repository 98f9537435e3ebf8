"""The calibration plot: relevant and irrelevant score distributions with the decisions drawn.

matplotlib is optional: :func:`plot_distributions` raises ``ImportError`` without it and
:func:`can_plot` says beforehand whether a plot can be drawn (the CLI then skips the PNG with
a note instead of ending in a traceback).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from nbce_rag.errors import CalibrationError
from nbce_rag.files import atomic_write
from nbce_rag.filtering.calibration import _as_arrays

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["can_plot", "plot_distributions"]


def can_plot() -> bool:
    """Whether matplotlib is installed (the plot is optional)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_distributions(
    th: Any,
    path: PathLike,
    scores: Any = None,
    labels: Any = None,
    *,
    title: Optional[str] = None,
) -> Path:
    """Write a PNG of the relevant and irrelevant score distributions with ``lower``, the
    keep threshold, the support threshold and ``upper`` drawn. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if scores is None:
        if th.data is None:
            raise CalibrationError("no calibration data to plot: pass scores and labels")
        scores, labels = th.data["scores"], th.data["labels"]
    s, y = _as_arrays(scores, labels)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    bins = np.linspace(float(s.min()), float(s.max()), 50)
    ax.hist(s[y == 0], bins=bins, density=True, alpha=0.55, color="tab:gray",
            label=f"irrelevant (n={int((y == 0).sum())})")
    ax.hist(s[y > 0], bins=bins, density=True, alpha=0.55, color="tab:green",
            label=f"relevant (n={int((y > 0).sum())})")
    ax.axvspan(th.lower, th.upper, color="tab:orange", alpha=0.12, label="uncertainty band")
    ax.axvline(th.lower, color="tab:orange", ls="--", lw=1.2, label=f"lower {th.lower:.3f}")
    ax.axvline(th.threshold, color="tab:red", lw=1.8, label=f"keep threshold {th.threshold:.3f}")
    sup = getattr(th, "support", None)
    if sup is not None and abs(sup.threshold - th.threshold) > 1e-9:
        ax.axvline(sup.threshold, color="tab:blue", lw=1.5, ls=":",
                   label=f"support threshold (on s_max) {sup.threshold:.3f}")
    gt = th.stats.get("global_threshold")
    if gt is not None and abs(gt - th.threshold) > 1e-9:
        ax.axvline(gt, color="tab:purple", lw=1.2, label=f"global t* (no margin) {gt:.3f}")
    ax.axvline(th.upper, color="tab:orange", ls="-.", lw=1.2, label=f"upper {th.upper:.3f}")
    if th.threshold_ci:
        ax.axvspan(*th.threshold_ci, color="tab:red", alpha=0.15, label="keep threshold 95% CI")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    m = "none" if th.margin is None else f"{th.margin:.3f}"
    rule = f"keep iff s >= {th.threshold:.3f} and s >= s_max - {m}"
    if sup is not None:
        rule += f"; supported iff s_max >= {sup.threshold:.3f}"
    ax.set_title(f"{title or 'Calibration: relevant vs irrelevant scores'}\n{rule}", fontsize=9.5)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return out
