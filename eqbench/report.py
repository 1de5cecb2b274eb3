"""One self-contained HTML report of a results directory (issue 5, item 2).

Why one file: a report is mailed, attached to a CI run or opened from an archive years later, so
it must need nothing beside itself. Figures are therefore inlined as SVG text (no ``<img src>``),
the style sheet is inline, there is no script and no external URL to fetch.

What it is built from, and only from: the long table of :mod:`eqbench.records` and
``baselines/published.csv`` (the published numbers, typed in by hand). The long table is rebuilt
from the cell files (``RESULTS/cells/``) when they are there, so a stale or truncated
``results.csv`` cannot pass for the results (the page says when it disagreed); cell files the
store does not use (unreadable, misnamed copies, duplicates, ``ok`` without records) are listed
with the reason. Without ``cells/`` (an archived table) it reads ``RESULTS/results.csv`` and says
so. Every verdict and every number on the page is computed from these tables when the report is
rendered; nothing is remembered from an earlier run.

**Every number means one thing.** The unit of aggregation is the settings key (a cell's whole
config without its seed, :func:`eqbench.tasks.reporting.with_settings`): a table row, a figure
series and a claim's number belong to one settings key, averaged over its seeds and nothing else.
Profiles are kept apart: claims are judged per profile, and only on ``quick`` and ``paper``
(:data:`~eqbench.tasks.reporting.VERDICT_PROFILES`); ``smoke`` and ``calibrate`` rows are shown
and judge nothing.

What a task shows is declared by the task (:meth:`eqbench.tasks.base.Task.report_section`,
returning a :class:`~eqbench.tasks.reporting.TaskSection` with its claims); this module iterates
over the registered tasks and renders. The page, top to bottom:

1. the paper's claims: one small figure per claim and profile (the measured numbers, mean ± std
   across seeds, beside the paper's number where one exists), then the verdict table
   (``reproduced`` / ``not reproduced`` / ``not measured`` / ``no verdict (smoke profile)``) with
   the evidence: profile, settings, seeds and spread of every number used;
2. the field's standard metrics (test NLL and KL at the peers' training size, sample-quality
   distances, reverse and forward ESS, reverse KL) per profile and system, one table per source
   task, one row per settings key, with the peers' published numbers beside them
   (:mod:`eqbench.standard_metrics_table`); then the conventions of every published row, once
   (data set, pair counting, NLL constant, estimator: ``published.csv``'s structured columns);
3. failed cells with their reasons (a failure must never hide behind a missing row), and the
   cell files not used, with theirs (a skipped file must never hide either);
4. per task and profile: the conventions its numbers follow, its figures, the measured headline
   metrics (one row per settings key: mean ± std across seeds, or over seeds × rounds where the
   task repeats rounds), and the matching published numbers beside them;
5. provenance: versions, git shas, devices, threads, hosts, platforms, profiles, time span.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import EqbenchError
from eqbench.tasks.reporting import (
    no_verdict_note,
    profiles_in_order,
    NO_VERDICT,
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    VERDICT_PROFILES,
    VERDICTS,
    Claim,
    ClaimResult,
    HtmlTable,
    TaskSection,
    capabilities_known,
    fmt,
    pm,
    seed_stats,
    with_settings,
)

if TYPE_CHECKING:
    import pandas

__all__ = [
    "Claim",
    "ClaimResult",
    "ClaimVerdict",
    "LoadedResults",
    "NO_VERDICT",
    "NOT_MEASURED",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "TaskSection",
    "VERDICTS",
    "aggregate",
    "baselines_path",
    "claims",
    "evaluate_claims",
    "inline_svg",
    "load_baselines",
    "BaselinesWarning",
    "BASELINE_COLUMNS",
    "load_results",
    "render_report",
    "task_sections",
    "write_report",
]

_fmt, _pm = fmt, pm


# -- the tasks' declarations ----------------------------------------------------------------------


def task_sections() -> list[TaskSection]:
    """The report sections declared by the registered tasks (:meth:`Task.report_section`), in
    page order; a task that declares none (or fails to load) is listed under "other tasks"."""
    from eqbench.registry import TASKS

    sections = []
    for name in TASKS.names():
        try:
            hook = getattr(TASKS.get(name), "report_section", None)
            section = hook() if callable(hook) else None
        except Exception as exc:  # noqa: BLE001  (a broken plugin must not take the page down)
            warnings.warn(f"task {name}: report_section failed: {type(exc).__name__}: {exc}", stacklevel=2)
            section = None
        if section is not None:
            sections.append(section)
    return sorted(sections, key=lambda s: (s.order, s.task))


def claims() -> list[tuple[TaskSection, Claim]]:
    """Every claim the registered tasks declare, with the section (task) that declares it."""
    return [(section, claim) for section in task_sections() for claim in section.claims]


# -- inputs ---------------------------------------------------------------------------------------


def baselines_path() -> Path:
    """``baselines/published.csv`` of the checkout that holds this package, else the copy shipped
    in the installed package (:func:`eqbench.resources.baselines_path`).

    Located from the package itself (not the working directory) so ``eqbench report`` run from
    anywhere uses the same published numbers, like ``tasks/`` profiles are found.
    """
    from eqbench import resources

    return resources.baselines_path()


class BaselinesWarning(UserWarning):
    """The published numbers could not be read (a missing, empty or malformed
    ``baselines/published.csv``): the report shows measured numbers only, and says so."""


#: The columns of ``baselines/published.csv`` (tests/test_baselines.py checks the file's schema).
BASELINE_COLUMNS = ("source", "table", "system", "model", "metric", "value", "error", "unit", "convention",
                    "data_set", "pair_counting", "nll_constant", "estimator", "note")
#: The structured convention columns (baselines/README.md): what the report's "Conventions of the
#: published rows" table shows beside each row's key, one cell each.
CONVENTION_COLUMNS = ("data_set", "pair_counting", "nll_constant", "estimator")


def load_baselines(path: Path | None = None) -> pandas.DataFrame:
    """The published numbers, or an empty table (with a one-line :class:`BaselinesWarning`)
    when the file is absent, empty or malformed (not CSV, a missing column, a value that is not a
    number).

    A bad baselines file must not stop a report of measured results: the empty table carries the
    reason in ``attrs["problem"]`` and the page says that it shows measured numbers only, and why.
    """
    import pandas as pd

    path = Path(path or baselines_path())

    def unavailable(problem: str) -> pandas.DataFrame:
        warnings.warn(f"{problem}; the report shows measured numbers only", BaselinesWarning, stacklevel=3)
        empty = pd.DataFrame(columns=list(BASELINE_COLUMNS))
        empty.attrs["problem"] = problem
        return empty

    if not path.exists():
        return unavailable(f"no published baselines at {path}")
    try:
        table = pd.read_csv(path, dtype={"error": "float64", "value": "float64"}, keep_default_na=False,
                            na_values={"value": [""], "error": [""]})
    except pd.errors.EmptyDataError:
        return unavailable(f"the published baselines {path} are empty")
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # pandas' ParserError is a ValueError
        text = " ".join(str(exc).split())[:200]
        return unavailable(f"the published baselines {path} cannot be read ({type(exc).__name__}: {text})")
    missing = [c for c in BASELINE_COLUMNS if c not in table.columns]
    if missing:
        return unavailable(f"the published baselines {path} lack the columns {', '.join(missing)} "
                           f"(expected: {', '.join(BASELINE_COLUMNS)})")
    if table.empty:
        return unavailable(f"the published baselines {path} hold no rows")
    return table


@dataclass
class LoadedResults:
    """The long table a report is built from, where it came from, and what was left out."""

    table: pandas.DataFrame
    #: ``"cells"`` (rebuilt from ``cells/``) or ``"results.csv"`` (no cells to rebuild from).
    source: str
    #: Cell files not used, with the reasons (:class:`eqbench.records.SkippedCell`).
    skipped: list[Any] = field(default_factory=list)
    #: One line when ``results.csv`` disagreed with the cells (or is missing), else "".
    note: str = ""


def _csv_summary(csv: Path) -> str:
    import pandas as pd

    try:
        ids = pd.read_csv(csv, usecols=["cell_id"], dtype=str)["cell_id"]
    except Exception as exc:  # noqa: BLE001  (whatever is wrong with it, it is described, not fatal)
        return f"unreadable ({type(exc).__name__})"
    return f"{ids.nunique()} cells, {len(ids)} rows"


def load_results(results_dir: Path | str) -> LoadedResults:
    """The long table of ``results_dir`` for a report: rebuilt from ``cells/`` when present
    (:meth:`eqbench.records.CellStore.table`, with the files it skipped and a note when
    ``results.csv`` says something else), else read from ``results.csv``. Writes nothing."""
    import io

    from eqbench.records import CellStore, SkippedCellWarning

    results_dir = Path(results_dir)
    store = CellStore(results_dir)
    csv = results_dir / "results.csv"
    if not store.cells_dir.is_dir():
        return LoadedResults(_read_results(results_dir), "results.csv")
    with warnings.catch_warnings():  # the skipped files are listed on the page and by the caller
        warnings.simplefilter("ignore", SkippedCellWarning)
        df, skipped = store.table()
    text = df.to_csv(index=False)
    note = ""
    if not csv.is_file():
        note = f"{csv} is missing; this page is built from the cell files"
    elif csv.read_bytes() != text.encode("utf-8"):
        note = (f"{csv} disagrees with the cell files (it holds {_csv_summary(csv)}; the cells give "
                f"{df['cell_id'].nunique()} cells, {len(df)} rows); this page is built from the cells, and "
                f"`eqbench collect --results {results_dir}` rewrites the table")
    return LoadedResults(_parse_results(io.StringIO(text), csv), "cells", list(skipped), note)


def _read_results(results_dir: Path) -> pandas.DataFrame:
    csv = results_dir / "results.csv"
    if not csv.exists():
        raise EqbenchError(f"no results table at {csv}; run a task or `eqbench collect --results {results_dir}` first")
    return _parse_results(csv, csv)


def _parse_results(source: Any, csv: Path) -> pandas.DataFrame:
    import pandas as pd

    # Hex ids are text: a key such as "12e4..." must not be read as a number.
    text = {c: str for c in ("cell_id", "settings_key", "capabilities", "code_version", "config_json")}
    table = pd.read_csv(source, low_memory=False, dtype=text)
    missing = {"cell_id", "task", "system", "model", "variant", "n_train", "seed", "metric", "value", "unit", "step",
               "status", "reason"} - set(table.columns)
    if missing:
        raise EqbenchError(f"{csv} is not an eqbench results table: columns {', '.join(sorted(missing))} are missing")
    for col in ("variant", "unit", "reason", "profile"):
        if col in table.columns:
            table[col] = table[col].astype(object).fillna("").astype(str)
    return table


def _ok(table: pandas.DataFrame) -> pandas.DataFrame:
    return table[table["status"] == "ok"]


def _ok(table: pandas.DataFrame) -> pandas.DataFrame:
    return with_settings(table[table["status"] == "ok"])


# -- per-task tables ------------------------------------------------------------------------------

_ID_COLUMNS = ["system", "model", "variant", "n_train", "profile", "settings"]


def aggregate(rows: pandas.DataFrame, metrics: Sequence[str], *, keep_step: bool = False) -> pandas.DataFrame:
    """Mean, std and count of ``metrics`` per (settings key[, step], metric): never across settings.

    ``keep_step=False`` pools every step of a settings key (seeds × rounds); ``True`` keeps
    ``step`` as a key (an x axis such as N). A metric ``m`` that has a companion ``m_std`` (a
    within-cell error, e.g. a bootstrap std) gets its mean as ``cell_error``, so a single-seed run
    still shows an error. Returned columns: ``settings_key``, the display columns
    (system, model, variant, n_train, profile, settings), [``step``], ``metric``, ``mean``, ``std``,
    ``n`` (values), ``n_seeds`` (distinct seeds), ``cell_error``, ``unit``.
    """
    import pandas as pd

    rows = with_settings(rows) if "settings" not in rows.columns else rows
    keys = ["settings_key"] + (["step"] if keep_step else [])
    columns = ["settings_key"] + _ID_COLUMNS + (["step"] if keep_step else []) + [
        "metric", "mean", "std", "n", "n_seeds", "cell_error", "unit"]
    sel = rows[rows["metric"].isin(list(metrics))].copy()
    if sel.empty:
        return pd.DataFrame(columns=columns)
    sel["value"] = sel["value"].astype(float)
    grouped = sel.groupby(keys + ["metric"], dropna=False, sort=True)
    out = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["n_seeds"] = grouped["seed"].nunique(dropna=False).to_numpy()
    out["unit"] = grouped["unit"].first().to_numpy()
    first = sel.drop_duplicates("settings_key").set_index("settings_key")
    for col in _ID_COLUMNS:
        out[col] = out["settings_key"].map(first[col])
    out["n_train"] = out["n_train"].astype("Float64")
    errs = rows[rows["metric"].isin([f"{m}_std" for m in metrics])].copy()
    if not errs.empty:
        errs["metric"] = errs["metric"].str.removesuffix("_std")
        errs["value"] = errs["value"].astype(float)
        err = errs.groupby(keys + ["metric"], dropna=False)["value"].mean().rename("cell_error").reset_index()
        out = out.merge(err, on=keys + ["metric"], how="left")
    else:
        out["cell_error"] = float("nan")
    order = {m: i for i, m in enumerate(metrics)}
    out["_order"] = out["metric"].map(order)
    sort = ["system", "model", "variant", "n_train", "profile", "settings"] + (["step"] if keep_step else [])
    out = out.sort_values(sort + ["_order"], kind="mergesort", na_position="first")
    return out.drop(columns="_order").reset_index(drop=True)[columns]


def _wide(agg: pandas.DataFrame, order: Sequence[str], caption: str, *,
          step_label: str | None = None, pooled: bool = False) -> HtmlTable | None:
    """One row per settings key [and step], one column per metric in ``order``.

    Wide because a reader compares models along a row; the unit goes into the column header.
    ``seeds`` is the number of distinct seeds behind the row; ``values`` (``pooled``) the number of
    values pooled (seeds × rounds).
    """
    if agg.empty:
        return None
    keys = ["settings_key"] + (["step"] if step_label else [])
    present = set(agg["metric"])
    metrics = [m for m in order if m in present]
    # A unit shared by every row goes into the header; a unit that differs between rows (the
    # solver named in dto-vs-otd's nll_test_train_solver) stays with each value.
    unit_sets = {m: set(agg.loc[agg["metric"] == m, "unit"].fillna("").astype(str)) for m in metrics}
    units = {m: next(iter(u)) if len(u) == 1 else "" for m, u in unit_sets.items()}
    has_err = {m: bool(agg.loc[agg["metric"] == m, "cell_error"].notna().any()) for m in metrics}
    header = list(_ID_COLUMNS) + ([step_label] if step_label else [])
    for m in metrics:
        header.append(f"{m} [{units[m]}]" if units[m] else m)
        if has_err[m]:
            header.append(f"{m}: cell error")
    header.append("seeds")
    if pooled:
        header.append("values")
    rows: list[list[str]] = []
    for _, group in agg.groupby(keys, dropna=False, sort=False):
        by_metric = {r["metric"]: r for _, r in group.iterrows()}
        head = group.iloc[0]
        cells = [_key_text(head[c]) for c in _ID_COLUMNS] + ([_key_text(head["step"])] if step_label else [])
        n_seeds = n_values = 0
        for m in metrics:
            r = by_metric.get(m)
            text = "–" if r is None else _pm(float(r["mean"]), float(r["std"]), int(r["n"]))
            if r is not None and len(unit_sets[m]) > 1 and r["unit"]:
                text += f" [{r['unit']}]"
            cells.append(text)
            if has_err[m]:
                cells.append("–" if r is None else _fmt(float(r["cell_error"]), 2))
            if r is not None:
                n_seeds, n_values = max(n_seeds, int(r["n_seeds"])), max(n_values, int(r["n"]))
        cells.append(str(n_seeds))
        if pooled:
            cells.append(str(n_values))
        rows.append(cells)
    return HtmlTable(caption=caption, header=header, rows=rows)


def _key_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        import pandas as pd

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _published_text(r: dict[str, Any]) -> str:
    err = r.get("error")
    value = _fmt(float(r["value"]))
    if err is not None and not (isinstance(err, float) and math.isnan(err)):
        value = f"{value} ± {_fmt(float(err), 3)}"
    return value


def _side_by_side(rows: pandas.DataFrame, baselines: pandas.DataFrame, section: TaskSection) -> HtmlTable | None:
    """Published numbers next to the measured numbers of the same quantity (``section.pair``), one
    row per settings key that measured it.

    Measured values are mean ± std across seeds; a round metric pools seeds × rounds, as the
    published ones are means over the paper's rounds.
    """
    import pandas as pd

    if baselines.empty or rows.empty:
        return None
    out = []
    for r in baselines.to_dict("records"):
        if not section.baseline(r):
            continue
        target = section.pair(r)
        if target is None:
            continue
        model, variant, metric, where = (*target, {}) if len(target) == 3 else target
        sel = rows[(rows["system"] == r["system"]) & (rows["model"] == model) & (rows["variant"] == variant)]
        for column, value in where.items():
            sel = sel[pd.to_numeric(sel[column], errors="coerce") == value]
        if metric in section.round_metrics:
            stats = aggregate(sel, [metric])
        else:
            stats = seed_stats(sel[sel["step"].isna()], metric).rename(columns={"n_seeds": "n"})
            stats["n_seeds"] = stats["n"]
        label = model + (f" ({variant})" if variant else "")
        for _, m in stats.iterrows():
            out.append([r["system"], f"{r['model']} → {label}", _key_text(m["n_train"]), str(m["profile"]),
                        str(m["settings"]), metric, _pm(float(m["mean"]), float(m["std"]), int(m["n"])),
                        str(int(m["n_seeds"])), _published_text(r), f"{r['source']}, {r['table']}", r["convention"]])
    if not out:
        return None
    return HtmlTable(caption="Side by side: measured here (per settings key, mean ± std across seeds) vs published "
                             "(same quantity)",
                     header=["system", "published row → measured model (variant)", "n_train", "profile", "settings",
                             "metric", "measured", "seeds", "published", "source", "published convention"],
                     rows=out)


def _baseline_table(baselines: pandas.DataFrame, section: TaskSection, systems: set[str]) -> HtmlTable | None:
    """Every published row that belongs beside ``section``, for the systems the task measured."""
    if baselines.empty:
        return None
    picked = [r for r in baselines.to_dict("records") if section.baseline(r) and r["system"] in systems]
    if not picked:
        return None
    rows = [[r["source"], r["table"], r["system"], r["model"], r["metric"], _published_text(r), r["unit"],
             r["convention"], r["note"]] for r in picked]
    return HtmlTable(caption="Published numbers (baselines/published.csv)",
                     header=["source", "table", "system", "model", "metric", "value", "unit", "convention", "note"],
                     rows=rows)


def _conventions_table(baselines: pandas.DataFrame) -> HtmlTable | None:
    """Every published row once, with its structured conventions (data set, pair counting, NLL
    constant, estimator): what a reader needs before putting any published number beside a
    measured one. ``None`` when no published numbers could be read."""
    if baselines.empty:
        return None
    rows = [[str(r[c]) for c in ("source", "table", "system", "model", "metric", *CONVENTION_COLUMNS)]
            for r in baselines.to_dict("records")]
    return HtmlTable(caption=f"Conventions of the published rows ({len(rows)} rows of baselines/published.csv)",
                     header=["source", "table", "system", "model", "metric", "data set", "pair counting",
                             "NLL constant", "estimator"],
                     rows=rows)


# -- claims ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimVerdict:
    """One claim judged on the rows of one profile (``profile`` is ``""`` when no rows exist)."""

    claim: Claim
    task: str
    profile: str
    result: ClaimResult

    @property
    def verdict_text(self) -> str:
        if self.result.verdict == NO_VERDICT:
            return f"{NO_VERDICT} ({self.profile or 'no'} profile)"
        return self.result.verdict


def evaluate_claims(table: pandas.DataFrame, baselines: pandas.DataFrame | None = None) -> list[ClaimVerdict]:
    """Every declared claim judged per profile present among its task's ok rows.

    ``quick`` and ``paper`` rows are judged by the claim's check (given the ok rows of that
    profile only); other profiles get ``no verdict``; a claim whose task has no ok rows is
    ``not measured``; a claim that selects models by capability on a table that does not record
    capabilities is ``not measured: capabilities not recorded``. A check that raises is
    ``not measured`` with the error named, so one malformed task never hides the other verdicts.
    Every evidence sentence starts with the profile it rests on.
    """
    ok = _ok(table)
    baselines = load_baselines() if baselines is None else baselines
    results = []
    for section, claim in claims():
        task_rows = ok[ok["task"] == section.task]
        profiles = profiles_in_order(task_rows) if not task_rows.empty else []
        if not profiles:
            results.append(ClaimVerdict(claim, section.task, "", ClaimResult(
                NOT_MEASURED, f"no ok {section.task} rows in this results table.")))
            continue
        for profile in profiles:
            rows = ok[ok["profile"] == profile]
            if profile not in VERDICT_PROFILES:
                res = ClaimResult(NO_VERDICT, no_verdict_note(profile))
            elif claim.needs and not capabilities_known(task_rows[task_rows["profile"] == profile]):
                res = ClaimResult(NOT_MEASURED, f"{profile} profile: capabilities not recorded (this table predates "
                                                f"the capabilities column; collect it again to judge models by "
                                                f"{', '.join(claim.needs)}).")
            else:
                try:
                    res = claim.check(rows, baselines)
                except Exception as exc:  # noqa: BLE001  (report the broken check, keep the page)
                    res = ClaimResult(NOT_MEASURED, f"the check failed on this table: {type(exc).__name__}: {exc}")
                res = ClaimResult(res.verdict, f"{profile} profile: {res.evidence}", res.points, res.quantity)
            results.append(ClaimVerdict(claim, section.task, profile, res))
    return results


def _claim_figure(cv: ClaimVerdict, index: int) -> str:
    """One small panel: the claim's numbers on one profile (mean ± std across seeds, dots) and the
    paper's number for the same quantity where one exists (red crosses), as inline SVG."""
    from eqbench.plots import new_figure

    import matplotlib.pyplot as plt

    points = cv.result.points
    fig, (ax,) = new_figure(1, width=4.4, height=0.9 + 0.3 * len(points))
    ys = list(range(len(points)))[::-1]
    for y, p in zip(ys, points):
        std = p.std if p.n_seeds > 1 and not math.isnan(p.std) else 0.0
        ax.errorbar([p.mean], [y], xerr=[std], fmt="o", color="C0", capsize=3, markersize=4)
        if p.published is not None:
            ax.plot([p.published], [y], "x", color="C3", markersize=7, markeredgewidth=2)
    ax.set_yticks(ys, [f"{p.label} ({p.n_seeds} seed{'s' if p.n_seeds != 1 else ''})" for p in points],
                  fontsize=6)
    ax.set_xlabel(cv.result.quantity + ("; ×: paper" if any(p.published is not None for p in points) else ""),
                  fontsize=7)
    ax.tick_params(axis="x", labelsize=6)
    ax.set_ylim(-0.7, len(points) - 0.3)
    ax.set_title(f"{cv.claim.key} — {cv.profile}: {cv.verdict_text}", fontsize=7)
    buf = io.StringIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="svg")
    finally:
        plt.close(fig)
    return inline_svg(buf.getvalue(), f"c{index}-")


# -- figures --------------------------------------------------------------------------------------

_PROLOG = re.compile(r"<\?xml[^>]*\?>\s*|<!DOCTYPE[^>]*>\s*", re.IGNORECASE)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_ID = re.compile(r'\bid="([^"]+)"')


def inline_svg(text: str, prefix: str) -> str:
    """SVG file text made fit to sit inline in HTML next to other SVGs.

    Drops the XML prolog and DOCTYPE (invalid inside HTML) and the RDF metadata block, and
    prefixes every ``id`` and every reference to it (``href="#id"``, ``url(#id)``) with ``prefix``:
    matplotlib numbers its clip paths and markers the same way in every figure, so two inline
    figures would otherwise draw each other's clip paths.
    """
    text = _METADATA.sub("", _PROLOG.sub("", text)).strip()
    ids = set(_ID.findall(text))
    if not ids:
        return text

    def ref(match: re.Match[str]) -> str:
        name = match.group(2)
        return f"{match.group(1)}{prefix}{name}{match.group(3)}" if name in ids else match.group(0)

    text = _ID.sub(lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r'(href="#)([^"]+)(")', ref, text)
    text = re.sub(r"(url\(#)([^)]+)(\))", ref, text)
    return text


@dataclass
class Figure:
    name: str
    svg: str


def _figures(task: str, table: pandas.DataFrame, work_dir: Path, prefix: str) -> tuple[list[Figure], str]:
    """The task's figures of ``table`` (rows of one profile) as inline SVG, drawn into
    ``work_dir`` (a temp dir). Returns the figures and a note: why there are none, if none."""
    from eqbench.plots import write_task_plots

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_task_plots(task, work_dir, table=table)
    svgs = sorted(p for p in paths if p.suffix == ".svg")
    figs = [Figure(p.stem, inline_svg(p.read_text(encoding="utf-8"), f"{prefix}f{i}-")) for i, p in enumerate(svgs)]
    note = ""
    if not figs:
        failed = [str(w.message) for w in caught if "plotting task" in str(w.message)]
        note = failed[0] if failed else "this task drew no figure from these rows"
    return figs, note


# -- provenance -----------------------------------------------------------------------------------

_PROVENANCE_COLUMNS = ("git_sha", "eqbench_version", "torch_version", "python_version", "numpy_version",
                       "device", "threads", "hostname", "platform", "profile", "code_version")


def _provenance(table: pandas.DataFrame) -> list[tuple[str, str]]:
    """Every distinct value of each provenance column with its number of cells, plus the time span."""
    cells = table.drop_duplicates("cell_id") if "cell_id" in table.columns else table
    items: list[tuple[str, str]] = [("cells", f"{len(cells)} ({int((cells['status'] == 'failed').sum())} failed), "
                                              f"{len(table)} records")]
    for col in _PROVENANCE_COLUMNS:
        if col not in cells.columns:
            continue
        counts = cells[col].astype(str).replace({"nan": "(unknown)", "": "(none)"}).value_counts()
        items.append((col, "; ".join(f"{v} ({n} cells)" for v, n in counts.items())))
    if "started_at" in cells.columns:
        started = cells["started_at"].dropna().astype(str)
        started = started[started != ""]
        if len(started):
            items.append(("cells started", f"{started.min()} … {started.max()}"))
    if "duration_s" in cells.columns:
        total = float(cells["duration_s"].sum(skipna=True))
        items.append(("total cell time", f"{total / 3600:.2f} h ({total:.0f} s)"))
    return items


# -- page -----------------------------------------------------------------------------------------

_TEMPLATE = """{% macro data_table(t, cls) %}
<div class="scroll"><table class="{{ cls }}">
<caption>{{ t.caption }}</caption>
<thead><tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in t.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}
</tbody></table></div>
{% endmacro %}
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>eqbench report: {{ results_dir }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.verdict { font-weight: 700; white-space: nowrap; }
.reproduced { color: #17632a; } .not-reproduced { color: #a11; } .not-measured { color: #777; }
.conventions { background: #f8f8f4; border-left: 4px solid #bbb; padding: 0.5em 1em; font-size: 0.9em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
.scroll { overflow-x: auto; }
.muted { color: #666; font-size: 0.9em; }
.no-verdict { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.3em 1em; font-size: 0.9em; }
.verdict.no-verdict { background: none; border: none; padding: 0; color: #8a6d00; }
.claim-figures { display: flex; flex-wrap: wrap; gap: 0.5em 1.5em; }
.claim-figure { margin: 0; max-width: 560px; }
</style>
</head>
<body>
<h1>eqbench report</h1>
<p class="muted">Results: <code>{{ results_dir }}</code> — {{ n_cells }} cells, {{ n_records }} records.
Reproducing Köhler, Klein &amp; Noé, “Equivariant Flows: Exact Likelihood Generative Learning for Symmetric
Densities”, ICML 2020. Generated {{ generated }} from <code>results.csv</code> and
<code>baselines/published.csv</code> only.</p>
{% if baselines_problem %}<p class="no-verdict">Published numbers unavailable: {{ baselines_problem }}. This page
shows the measured numbers only: no published number is placed beside them or in a verdict.</p>{% endif %}

<nav><strong>Contents:</strong> <a href="#claims">claims</a> · <a href="#standard-metrics">standard metrics</a>
· <a href="#published-conventions">conventions of the published rows</a>
· <a href="#failed-cells">failed cells</a>
· <a href="#skipped-cells">cell files not used</a>
{% for s in sections %} · <a href="#task-{{ s.task }}">{{ s.task }}</a>{% endfor %} · <a href="#provenance">provenance</a>
</nav>

<section id="claims">
<h2>The paper's claims</h2>
{% if skipped %}
<p class="no-verdict">{{ skipped | length }} cell file{{ '' if skipped | length == 1 else 's' }} could not be used
(<a href="#skipped-cells">listed below</a> with the reasons): these verdicts rest on the other cells only.</p>
{% endif %}
{% if note %}<p class="no-verdict">{{ note }}.</p>{% endif %}
<p class="muted">Judged per profile, on {{ verdict_profiles }} runs only; every number is one settings key
(the cell config without its seed), mean ± std across its seeds. Each panel: the measured numbers a verdict rests
on (dots, bars: std across seeds) and the paper's number where one exists (red ×).</p>
{% if claim_figures %}
<div class="claim-figures">
{% for f in claim_figures %}
<figure class="claim-figure" id="claim-figure-{{ f.key }}-{{ f.profile }}">{{ f.svg | safe }}
<figcaption>{{ f.statement }} — {{ f.profile }} profile: <span class="verdict {{ f.css }}">{{ f.verdict }}</span>
</figcaption></figure>
{% endfor %}
</div>
{% else %}
<p class="muted">No claim has measured numbers in this table yet.</p>
{% endif %}
<table class="claims">
<caption>Verdicts computed from the measured numbers of this run, per profile</caption>
<thead><tr><th>claim</th><th>paper</th><th>profile</th><th>verdict</th><th>evidence</th></tr></thead>
<tbody>
{% for cv in claims %}
<tr id="claim-{{ cv.claim.key }}-{{ cv.profile or 'none' }}" class="claim-{{ cv.claim.key }}"><td>{{ cv.claim.statement }}</td>
<td>{{ cv.claim.paper }}</td><td>{{ cv.profile or '–' }}</td>
<td class="verdict {{ cv.result.verdict | replace(' ', '-') }}">{{ cv.verdict_text }}</td><td>{{ cv.result.evidence }}</td></tr>
{% endfor %}
</tbody>
</table>
<p class="muted">How each verdict is decided (thresholds) is documented in the docstring of each claim's check,
in the module of the task that declares it (<code>eqbench/tasks/*.py</code>). Claims name the model capability
they need (equivariant, cnf), never a model id. “not measured”: the rows the check needs are absent from this
results table. “no verdict”: the profile's runs are too short to decide anything.</p>
</section>

<section id="standard-metrics">
<h2>Standard metrics</h2>
<p class="muted">The numbers later work reports, per profile and system: test NLL and KL(p‖q) of density estimation
at the peers' training size (n_train = {{ peer_n_train }}), energy / distance / coordinate distances of the flow
samples, reverse and forward ESS and the reweighted distances of Boltzmann-generator reweighting, and the reverse KL
of training from the energy alone. One table per source task (they train differently, so a column keeps one
meaning); one row per settings key, mean ± std across its seeds, never across settings or profiles; “–”: that row's
cells did not record the metric. Units are the records' own, listed under each table. Published numbers sit beside,
with their convention: they use other data sets and protocols.</p>
{% for b in standard_metrics %}
{% if loop.changed(b.profile) %}
<h3 id="standard-metrics-{{ b.profile or 'none' }}">Profile {{ b.profile or '(none)' }}</h3>
{% if b.verdict_note %}<p class="no-verdict">{{ b.profile or '(none)' }}: no verdict. {{ b.verdict_note }}</p>{% endif %}
{% endif %}
<h4 id="standard-metrics-{{ b.profile or 'none' }}-{{ b.system }}">{{ b.system }} ({{ b.profile or '(none)' }} profile)</h4>
{% for n in b.notes %}<p class="muted">{{ n }}</p>
{% endfor %}
{% for t in b.tables %}
{{ data_table(t, 'standard-metrics') }}
{% endfor %}
{% else %}
<p class="muted">No density-estimation, bg-reweighting or energy-training results in this table.</p>
{% endfor %}
</section>

<section id="published-conventions">
<h2>Conventions of the published rows</h2>
{% if conventions %}
<p class="muted">Every row of <code>baselines/published.csv</code> once, whether or not a measured number sits
beside it: the data set it was measured on, how its energy counts particle pairs (“ordered pairs (each twice)”:
a sum over i ≠ j, eqbench's Lennard-Jones convention; “unordered pairs (each once)”: a sum over i &lt; j, as the
double well's and the single-count Lennard-Jones energy's), whether an
NLL includes the Gaussian normalising constant ½ (N-1) D log 2π, and the estimator behind the number. “n/a”: that
convention does not enter the number; “not stated”: the source does not say. The task sections show each row's
free-text convention and note beside the measured numbers it belongs to; baselines/README.md says where each number
comes from.</p>
{{ data_table(conventions, 'published-conventions') }}
{% else %}
<p class="muted">No published numbers could be read, so there are no conventions to list.</p>
{% endif %}
</section>

<section id="failed-cells">
<h2>Failed cells</h2>
{% if failed %}
<div class="scroll"><table class="failed">
<caption>{{ failed | length }} failed cell{{ '' if failed | length == 1 else 's' }}: no results are shown for
them</caption>
<thead><tr>{% for h in failed_header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in failed %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}
</tbody></table></div>
{% else %}
<p>None: every cell finished.</p>
{% endif %}
</section>

<section id="skipped-cells">
<h2>Cell files not used</h2>
{% if source == "cells" %}
<p class="muted">The table of this page is rebuilt from the cell files under <code>cells/</code>; a file counts
only where the store writes it (named by its cell id, the hash of its config), each cell once, and a finished cell
only with records.{% if note %} {{ note }}.{% endif %}</p>
{% if skipped %}
<div class="scroll"><table class="skipped">
<caption>{{ skipped | length }} cell file{{ '' if skipped | length == 1 else 's' }} not used: none of their
numbers are on this page</caption>
<thead><tr><th>file</th><th>task</th><th>cell id</th><th>reason</th></tr></thead>
<tbody>
{% for c in skipped %}<tr><td>{{ c.path }}</td><td>{{ c.task }}</td><td>{{ c.cell_id }}</td><td>{{ c.reason }}</td></tr>
{% endfor %}
</tbody></table></div>
{% else %}
<p>None: every cell file was read and used.</p>
{% endif %}
{% else %}
<p class="muted">Built from <code>results.csv</code> alone: there is no <code>cells/</code> directory beside it to
check it against.</p>
{% endif %}
</section>

{% for s in sections %}
<section id="task-{{ s.task }}" class="task">
<h2>{{ s.title }} <span class="muted">({{ s.task }}; paper {{ s.paper }})</span></h2>
{% if s.empty %}
<p class="muted">No results of this task in this results table.</p>
{% else %}
<div class="conventions"><strong>Conventions.</strong> {{ s.conventions }}</div>
{% for p in s.profiles %}
<h3 id="task-{{ s.task }}-{{ p.name }}">Profile {{ p.name }}</h3>
{% if p.note %}<p class="no-verdict">{{ p.note }}</p>{% endif %}
{% for fig in p.figures %}
<figure>{{ fig.svg | safe }}<figcaption>{{ s.task }} ({{ p.name }} profile): {{ fig.name }}</figcaption></figure>
{% else %}
<p class="muted">No figure: {{ p.figure_note }}.</p>
{% endfor %}
{% for t in p.tables %}
{{ data_table(t, 'results') }}
{% endfor %}
{% endfor %}
{% if s.published %}
{% for t in s.published %}
{{ data_table(t, 'published') }}
{% endfor %}
{% else %}
<p class="muted">{{ s.no_baseline or 'No published numbers match this task.' }}</p>
{% endif %}
{% endif %}
</section>
{% endfor %}

{% if other_tasks %}
<section id="other-tasks">
<h2>Other tasks in this table</h2>
<p>{{ other_tasks | join(', ') }}: results present, but not part of the paper's experiments this report
summarises; see <code>results.csv</code>.</p>
</section>
{% endif %}

<section id="provenance">
<h2>Provenance</h2>
<table class="provenance">
<caption>Where and with what the cells ran (distinct values, with the number of cells)</caption>
<tbody>
{% for k, v in provenance %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}
</tbody></table>
</section>
</body>
</html>
"""


def _section_context(section: TaskSection, table: pandas.DataFrame, ok: pandas.DataFrame,
                     baselines: pandas.DataFrame, work_dir: Path, index: int) -> dict[str, Any]:
    rows = ok[ok["task"] == section.task]
    ctx: dict[str, Any] = {"task": section.task, "title": section.title, "paper": section.paper,
                           "conventions": section.conventions, "no_baseline": section.no_baseline,
                           "empty": rows.empty, "profiles": [], "published": []}
    if rows.empty:
        return ctx
    for k, profile in enumerate(profiles_in_order(rows)):
        prows = rows[rows["profile"] == profile]
        ptable = table[(table["task"] == section.task) & (table["profile"].astype(str) == profile)]
        figures, note = _figures(section.task, ptable, work_dir / f"t{index}p{k}", f"t{index}p{k}")
        tables = []
        if section.metrics:
            flat = prows[prows["step"].isna()]
            tables.append(_wide(aggregate(flat, section.metrics), section.metrics,
                                f"Measured ({profile} profile): one row per settings key, mean ± std across seeds"))
        if section.round_metrics:
            tables.append(_wide(aggregate(prows, section.round_metrics), section.round_metrics,
                                f"Measured ({profile} profile): one row per settings key, mean ± std over seeds × "
                                "rounds", pooled=True))
        if section.axis_metrics:
            stepped = prows[prows["step"].notna()]
            tables.append(_wide(aggregate(stepped, section.axis_metrics, keep_step=True), section.axis_metrics,
                                f"Measured ({profile} profile) per {section.axis_label}: one row per settings key, "
                                "mean ± std across seeds", step_label=section.axis_label))
        beside = [_side_by_side(prows, baselines, section)]
        if section.extra_tables is not None:
            beside += section.extra_tables(prows, baselines)
        ctx["profiles"].append({
            "name": profile or "(none)",
            "note": "" if profile in VERDICT_PROFILES else no_verdict_note(profile),
            "figures": figures, "figure_note": note,
            "tables": [t for t in tables + beside if t is not None],
        })
    published = _baseline_table(baselines, section, set(rows["system"].astype(str)))
    ctx["published"] = [published] if published is not None else []
    return ctx


def _failed_rows(table: pandas.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["task", "system", "model", "variant", "n_train", "profile", "seed", "cell_id", "started", "reason"]
    failed = table[(table["status"] == "failed") | (table["metric"] == "cell_failed")]
    failed = failed.drop_duplicates("cell_id") if "cell_id" in failed.columns else failed
    rows = []
    for r in failed.to_dict("records"):
        rows.append([_key_text(r.get(c)) for c in ("task", "system", "model", "variant", "n_train", "profile", "seed",
                                                    "cell_id", "started_at")] + [str(r.get("reason") or "(no reason)")])
    return header, rows


def render_report(results_dir: Path | str, *, baselines: pandas.DataFrame | None = None,
                  loaded: LoadedResults | None = None) -> str:
    """The report of ``results_dir`` as one HTML string (see the module docstring); ``loaded``:
    its :func:`load_results`, if the caller has it already."""
    import datetime as dt

    import jinja2

    results_dir = Path(results_dir)
    loaded = load_results(results_dir) if loaded is None else loaded
    table = loaded.table
    if "profile" not in table.columns:
        table["profile"] = ""
    baselines = load_baselines() if baselines is None else baselines
    sections = task_sections()
    known = {s.task for s in sections}
    ok = _ok(table)
    verdicts = evaluate_claims(table, baselines)
    claim_figures = []
    for i, cv in enumerate(verdicts):
        if cv.result.points:
            claim_figures.append({"key": cv.claim.key, "profile": cv.profile, "statement": cv.claim.statement,
                                  "verdict": cv.verdict_text, "css": cv.result.verdict.replace(" ", "-"),
                                  "svg": _claim_figure(cv, i)})
    with tempfile.TemporaryDirectory(prefix="eqbench-report-") as tmp:
        contexts = [_section_context(s, table, ok, baselines, Path(tmp), i) for i, s in enumerate(sections)]
    failed_header, failed = _failed_rows(table)
    from eqbench.standard_metrics_table import peer_n_train, standard_metrics

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(_TEMPLATE).render(
        results_dir=str(results_dir),
        n_cells=int(table["cell_id"].nunique()) if "cell_id" in table.columns else len(table),
        n_records=len(table),
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        claims=verdicts,
        claim_figures=claim_figures,
        verdict_profiles=" and ".join(VERDICT_PROFILES),
        failed=failed,
        failed_header=failed_header,
        skipped=loaded.skipped,
        source=loaded.source,
        note=loaded.note,
        sections=contexts,
        standard_metrics=standard_metrics(ok, baselines),
        conventions=_conventions_table(baselines),
        peer_n_train=f"{peer_n_train():,}",
        other_tasks=sorted(set(table["task"].dropna().astype(str)) - known),
        provenance=_provenance(table),
        baselines_problem=str(baselines.attrs.get("problem", "")),
    )


def write_report(results_dir: Path | str, out: Path | str | None = None, *,
                 loaded: LoadedResults | None = None) -> Path:
    """Render the report of ``results_dir`` and write it atomically to ``out``
    (default ``results_dir/report.html``); returns the path written. A write that fails (a full
    disk) is one :class:`~eqbench.errors.OutputError` line and leaves no partial file."""
    from eqbench.atomic import atomic_write_text
    from eqbench.errors import OutputError

    results_dir = Path(results_dir)
    out_path = Path(out) if out is not None else results_dir / "report.html"
    html = render_report(results_dir, loaded=loaded)
    try:
        atomic_write_text(out_path, html)
    except OSError as exc:
        raise OutputError(f"cannot write the report {out_path}: {exc.strerror or exc}") from None
    return out_path
