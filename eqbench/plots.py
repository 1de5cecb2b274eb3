"""Figures from the long results table only (DESIGN "plots.py").

Each task draws its own figures in ``Task.plot(table, out_dir)``; this module holds what they
share: a headless matplotlib backend, one seaborn theme, atomic PNG + SVG output, and
:func:`write_task_plots`, which reads ``results.csv`` and hands each task its ok rows. Because
plots read nothing but the table, any figure can be redrawn later with ``eqbench plot``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "distinguish_settings", "new_figure", "save_figure", "write_task_plots", "metric_rows"]

#: Every figure is written in these formats, side by side.
FORMATS: tuple[str, ...] = ("png", "svg")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # never needs a display; safe in CI and on clusters
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind")
    return plt


def new_figure(n_panels: int = 1, *, width: float = 4.2, height: float = 3.4, **kwargs: Any):
    """A figure with ``n_panels`` axes side by side; returns ``(fig, list_of_axes)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False, **kwargs)
    return fig, list(axes[0])


def save_figure(fig: Figure, out_dir: Path | str, stem: str) -> list[Path]:
    """Write ``fig`` as ``out_dir/stem.png`` and ``.svg`` atomically and close it."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        fig.tight_layout()
        for fmt in FORMATS:
            target = out_dir / f"{stem}.{fmt}"
            fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".{fmt}", dir=out_dir)
            os.close(fd)
            try:
                fig.savefig(tmp, format=fmt, dpi=150)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            written.append(target)
    finally:
        plt.close(fig)
    return written


def metric_rows(table: pandas.DataFrame, metric: str | list[str]) -> pandas.DataFrame:
    """Rows of ``table`` whose metric is ``metric`` (or one of a list)."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    return table[table["metric"].isin(metrics)]


def write_task_plots(task: str, results_dir: Path | str, *, table: pandas.DataFrame | None = None) -> list[Path]:
    """Draw ``task``'s figures into ``results_dir/plots/<task>/`` from the collected table.

    Never pools settings: the task's ``plot`` is called once per profile (a smoke and a quick cell
    of one model share its seed and its step axis, and pooling them drew nonsense or nothing);
    when several profiles are present each file name gets ``_<profile>`` appended. Within a
    profile, rows of settings keys that would show the same model get the differing settings
    appended to their ``model`` label (``node lr=0.001``), so every figure that groups by model
    keeps them apart. The rows carry :func:`eqbench.tasks.reporting.with_settings`' columns.

    A task without ok rows draws nothing. A plotting error is a warning, not a failed run: the
    records are the result, the figure only shows them.
    """
    import pandas as pd

    from eqbench.registry import TASKS
    from eqbench.tasks.reporting import with_settings

    results_dir = Path(results_dir)
    if table is None:
        csv = results_dir / "results.csv"
        if not csv.exists():
            return []
        text = {c: str for c in ("cell_id", "settings_key", "capabilities", "code_version", "config_json")}
        table = pd.read_csv(csv, low_memory=False, dtype=text)
    rows = table[(table["task"] == task) & (table["status"] == "ok")]
    if rows.empty:
        return []
    rows = distinguish_settings(with_settings(rows.reset_index(drop=True)))
    out_dir = results_dir / "plots" / task
    profiles = sorted(rows["profile"].unique())
    written: list[Path] = []
    for profile in profiles:
        sub = rows[rows["profile"] == profile].reset_index(drop=True)
        try:
            if len(profiles) == 1:
                written += TASKS.get(task).plot(sub, out_dir)
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".plot-", dir=out_dir) as tmp:
                for path in TASKS.get(task).plot(sub, Path(tmp)):
                    stem = path.stem if path.stem.endswith(f"_{profile}") else f"{path.stem}_{profile or 'none'}"
                    target = out_dir / f"{stem}{path.suffix}"
                    os.replace(path, target)
                    written.append(target)
        except Exception as exc:  # noqa: BLE001  (a figure must never lose the records)
            warnings.warn(f"plotting task {task} (profile {profile or 'none'}) failed: {type(exc).__name__}: {exc}",
                          stacklevel=2)
    return written


def distinguish_settings(rows: pandas.DataFrame) -> pandas.DataFrame:
    """``rows`` with the ``settings`` label appended to ``model`` where it is not empty, so that
    figures grouping by model draw two settings of one model as two series (never their mean)."""
    rows = rows.copy()
    extra = rows["settings"].astype(str)
    rows["model"] = rows["model"].astype(str).where(extra == "", rows["model"].astype(str) + " " + extra)
    return rows
