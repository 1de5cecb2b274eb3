"""The field's standard metrics, one table per (profile, system, source task) (issue 16, item 6).

A researcher scanning the report for "which model is best on LJ-13" wants the numbers later work
reports (test NLL, KL to the target, energy / distance / coordinate Wasserstein and TV distances,
reverse and forward ESS, reverse KL) in one place per system, with the peers' published numbers
beside them. This module builds those tables from the ok rows of a results table (with
:func:`eqbench.tasks.reporting.with_settings`' columns) and ``baselines/published.csv``, as
:class:`~eqbench.tasks.reporting.HtmlTable` s, so they are testable without HTML;
:mod:`eqbench.report` renders them right after the claims.

Layout, and why. One block per profile (profiles are never mixed; a profile that decides no claim
is labelled ``<profile> profile: no verdict``), inside it one block per system, inside that one
table per source task: density estimation at the peers' training size (``n_train`` =
:data:`~eqbench.tasks.density_estimation.PEER_N_TRAIN`), Boltzmann-generator reweighting, and
training from the energy alone. The three tasks train differently (on data, on data then
reweighted, from the energy), so a number of one is not a number of the other even under the same
metric name: one table each keeps a column to one meaning, and a "–" then means that this
model's cells lack the metric, not that the task never measures it. Columns no cell of the table
recorded are left out and named in the caption.

Every row is one settings key (the cell config without its seed): mean ± std across its seeds
(:func:`~eqbench.tasks.reporting.seed_stats`), never across settings keys or profiles; ``seeds``
counts them (a value resting on fewer seeds than its row says so). ``kl_test_stderr`` is shown
as its typical size, the mean over seeds of each cell's standard error. Units come from the
records' ``unit`` column and are listed under each table; where one column holds more than one
unit (different subsample counts, an exact and an estimated density) every value carries the
letter of its unit, so numbers of different units are never read as one; a test NLL always
carries its estimator (``exact`` or ``IW estimate K=…``). Published rows (``midgley2023``'s
``nll_test`` beside ``nll_test``, ``reverse_ess`` beside reverse ESS) sit under the measured rows
with their source, convention and unit (or the statement that the source gives none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eqbench.tasks.reporting import (VERDICT_PROFILES, HtmlTable, fmt, no_verdict_note, pm, profiles_in_order,
                                     seed_stats, with_settings)

if TYPE_CHECKING:
    import pandas

__all__ = ["PUBLISHED_METRICS", "SOURCES", "Source", "StandardMetricsBlock", "peer_n_train", "standard_metrics"]

#: Published metric name -> the measured column it sits beside.
PUBLISHED_METRICS: dict[str, str] = {"nll_test": "nll_test", "reverse_ess": "ess_fraction"}

#: Columns whose unit is written beside every value (the estimator of a test NLL).
_INLINE_UNIT = ("nll_test",)
#: Columns shown as the mean over seeds of a per-cell error, not as mean ± std.
_TYPICAL = ("kl_test_stderr",)

_HEADER = {
    "nll_test": "nll_test (test NLL)",
    "kl_test": "kl_test (KL(p‖q) = NLL − H(p))",
    "kl_test_stderr": "kl_test_stderr (typical: mean over seeds)",
    "ess_fraction": "ess_fraction (reverse ESS)",
    "forward_ess_fraction": "forward_ess_fraction (forward ESS)",
    "reverse_kl": "reverse_kl (KL(q‖p))",
}


@dataclass(frozen=True)
class Source:
    """One source task of the standard metrics: its metrics (columns, in order) and which of its
    rows count (``where``: a mask over its ok rows)."""

    task: str
    title: str
    metrics: tuple[str, ...]
    where: Callable[[pandas.DataFrame], Any] | None = None
    #: Why rows of the task may be absent from the table (shown when none qualify).
    absent: str = ""


def peer_n_train() -> int:
    """The peers' training size, :data:`eqbench.tasks.density_estimation.PEER_N_TRAIN`."""
    from eqbench.tasks.density_estimation import PEER_N_TRAIN

    return PEER_N_TRAIN


def _atpeer_n_train(rows: pandas.DataFrame) -> Any:
    import pandas as pd

    return pd.to_numeric(rows["n_train"], errors="coerce") == peer_n_train()


SOURCES: tuple[Source, ...] = (
    Source("density-estimation", "density estimation, trained on data at the peers' n_train",
           ("nll_test", "kl_test", "kl_test_stderr", "energy_w1_flow", "energy_w2_flow", "dist_tv_flow",
            "coord_w2_flow", "coord_w2_aligned_flow"),
           where=_atpeer_n_train, absent="cells in this profile, but none at the peers' n_train"),
    Source("bg-reweighting", "Boltzmann generator: trained on data, samples reweighted to the target",
           ("ess_fraction", "forward_ess_fraction", "energy_w2_reweighted", "dist_tv_reweighted")),
    Source("energy-training", "trained from the energy alone (reverse KL)",
           ("ess_fraction", "forward_ess_fraction", "energy_w2_reweighted", "dist_tv_reweighted", "reverse_kl")),
)


@dataclass
class StandardMetricsBlock:
    """The standard-metrics tables of one profile and system: per source task a table and the
    table of its units (``tables`` alternates them), and notes (sources with rows but none that
    qualify)."""

    profile: str
    system: str
    verdict_note: str
    tables: list[HtmlTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _label(profile: str) -> str:
    return f"{profile or '(none)'} profile" + ("" if profile in VERDICT_PROFILES else ": no verdict")


def _marks(n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [letters[i] if i < len(letters) else f"u{i}" for i in range(n)]


def _published_value(r: dict[str, Any]) -> str:
    value = fmt(float(r["value"]))
    err = r.get("error")
    if err is not None and not (isinstance(err, float) and math.isnan(err)) and str(err) != "":
        value = f"{value} ± {fmt(float(err), 3)}"
    return value


def _table(rows: pandas.DataFrame, published: list[dict[str, Any]], source: Source, system: str,
           profile: str) -> list[HtmlTable]:
    """The table of one (profile, system, source) and its units table; [] when nothing to show."""
    stats = seed_stats(rows, source.metrics)
    pub_cols = {PUBLISHED_METRICS[r["metric"]] for r in published}
    metrics = [m for m in source.metrics if m in set(stats["metric"]) or m in pub_cols]
    if not metrics:
        return []
    unrecorded = [m for m in source.metrics if m not in metrics]
    # Units per (settings key, metric) from the records, then per column.
    units_of = (rows[rows["metric"].isin(metrics)].groupby(["settings_key", "metric"])["unit"]
                .agg(lambda u: sorted(set(u.astype(str)))).to_dict())
    col_units = {m: sorted({u for (_, mm), us in units_of.items() if mm == m for u in us}) for m in metrics}
    marks = {m: dict(zip(col_units[m], _marks(len(col_units[m])))) for m in metrics}
    show_n_train = stats["n_train"].astype(str).nunique() > 1

    header = ["model", "variant", "settings"] + (["n_train"] if show_n_train else []) + ["seeds"]
    header += [_HEADER.get(m, m) for m in metrics] + ["source / convention"]
    out: list[list[str]] = []
    for key, group in stats.groupby("settings_key", sort=False):
        by = {r["metric"]: r for _, r in group.iterrows()}
        first = group.iloc[0]
        n_row = max(int(r["n_seeds"]) for r in by.values())
        cells = [str(first["model"]), str(first["variant"]), str(first["settings"])]
        if show_n_train:
            cells.append(fmt(first["n_train"]))
        cells.append(str(n_row))
        for m in metrics:
            r = by.get(m)
            if r is None:
                cells.append("–")
                continue
            n = int(r["n_seeds"])
            text = fmt(float(r["mean"]), 3) if m in _TYPICAL else pm(float(r["mean"]), float(r["std"]), n)
            units = units_of.get((key, m), [])
            if m in _INLINE_UNIT:
                text += " (" + "; ".join(u.removeprefix("nats, ") for u in units) + ")"
            elif len(col_units[m]) > 1:
                text += " [" + ", ".join(marks[m][u] for u in units) + "]"
            if n != n_row:
                text += f" ({n} seed{'s' if n != 1 else ''})"
            cells.append(text)
        cells.append("measured here (eqbench, this results table)")
        out.append(cells)
    out.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
    for r in published:
        column = PUBLISHED_METRICS[r["metric"]]
        cells = [str(r["model"]), "", f"published: {r['source']}, {r['table']}"]
        cells += [""] if show_n_train else []
        cells.append("–")
        cells += [_published_value(r) if m == column else "–" for m in metrics]
        unit = str(r.get("unit") or "").strip()
        cells.append(f"{r['source']} ({r['table']}), {r['metric']}: {r['convention']}; "
                     + (f"unit: {unit}" if unit else "unit: none stated in the source, so not comparable "
                                                     "number for number"))
        out.append(cells)
    caption = (f"{system}, {_label(profile)} — {source.task}: {source.title}; one row per settings key, "
               "mean ± std across its seeds; – : not recorded by that row's cells")
    if source.task == "density-estimation":
        caption += f"; n_train = {peer_n_train():,} only"
    if unrecorded:
        caption += f"; recorded by no cell here: {', '.join(unrecorded)}"

    def mark(m: str, u: str) -> str:
        if m in _INLINE_UNIT:
            return "written beside each value"
        return marks[m][u] if len(col_units[m]) > 1 else ""

    units_rows = [[_HEADER.get(m, m), mark(m, u), u] for m in metrics for u in col_units[m]]
    for r in published:
        unit = str(r.get("unit") or "").strip()
        units_rows.append([_HEADER.get(PUBLISHED_METRICS[r["metric"]], r["metric"]),
                           f"published ({r['source']})", unit or "none stated in the source"])
    units = HtmlTable(caption=f"Units of the {system} {source.task} table above ({_label(profile)}), from the "
                              "records' unit column; a letter marks each value where a column holds several",
                      header=["column", "mark", "unit"], rows=units_rows)
    return [HtmlTable(caption=caption, header=header, rows=out), units]


def standard_metrics(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> list[StandardMetricsBlock]:
    """The standard-metrics blocks of ``ok`` (the ok rows of a results table), one per (profile,
    system) that has rows of a source task, profiles in ``profile_order`` of :mod:`eqbench.report`
    and systems sorted; ``baselines``: the published numbers (may be empty)."""
    if ok.empty or "task" not in ok.columns:
        return []
    ok = with_settings(ok) if "settings" not in ok.columns else ok
    ok = ok[ok["task"].isin([s.task for s in SOURCES])]
    if "step" in ok.columns:
        ok = ok[ok["step"].isna()]
    published = [] if baselines.empty else [r for r in baselines.to_dict("records")
                                            if r.get("metric") in PUBLISHED_METRICS]
    blocks = []
    for profile in profiles_in_order(ok) if not ok.empty else []:
        prows = ok[ok["profile"].astype(str) == profile]
        for system in sorted(set(prows["system"].astype(str))):
            srows = prows[prows["system"].astype(str) == system]
            block = StandardMetricsBlock(profile, system,
                                         "" if profile in VERDICT_PROFILES else no_verdict_note(profile))
            for source in SOURCES:
                trows = srows[srows["task"] == source.task]
                if trows.empty:
                    continue
                if source.where is not None:
                    trows = trows[source.where(trows)]
                    if trows.empty:
                        block.notes.append(f"{source.task}: {source.absent} = {peer_n_train():,}, so no row here.")
                        continue
                pub = [r for r in published if str(r["system"]) == system
                       and PUBLISHED_METRICS[r["metric"]] in source.metrics]
                block.tables += _table(trows, pub, source, system, profile)
            if block.tables or block.notes:
                blocks.append(block)
    return blocks
