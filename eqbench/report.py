"""One self-contained HTML report of a results directory (issue 5, item 2).

Why one file: a report is mailed, attached to a CI run or opened from an archive years later, so
it must need nothing beside itself. Figures are therefore inlined as SVG text (no ``<img src>``),
the style sheet is inline, there is no script and no external URL to fetch.

What it is built from, and only from: ``RESULTS/results.csv`` (the long table of
:mod:`eqbench.records`) and ``baselines/published.csv`` (the published numbers, typed in by hand).
Every verdict and every number on the page is computed from these two tables when the report is
rendered; nothing is remembered from an earlier run.

The page, top to bottom:

1. the paper's five claims, each with a verdict (``reproduced`` / ``not reproduced`` /
   ``not measured``) and one sentence naming the measured numbers it rests on (:data:`CLAIMS`);
2. failed cells with their reasons (a failure must never hide behind a missing row);
3. per task: the conventions its numbers follow, its figures, the measured headline metrics
   (mean ± standard deviation over seeds, or over rounds where the task repeats rounds), and the
   matching published numbers beside them with their convention and note columns;
4. provenance: versions, git shas, devices, threads, hosts, platforms, profiles, time span.
"""

from __future__ import annotations

import math
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import EqbenchError

if TYPE_CHECKING:
    import pandas

__all__ = [
    "CLAIMS",
    "Claim",
    "ClaimResult",
    "TASK_SECTIONS",
    "TaskSection",
    "aggregate",
    "baselines_path",
    "inline_svg",
    "load_baselines",
    "render_report",
    "write_report",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_MEASURED = "not measured"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_MEASURED)

#: The paper's equivariant flow: every claim of the paper about "the equivariant flow" was made
#: with its kernel flow (Fig. 5, 6, 7, Table 1, 2), so the claims are checked on that model.
EQUIVARIANT_FLOW = "kernel-flow"


# -- inputs ---------------------------------------------------------------------------------------


def baselines_path() -> Path:
    """``baselines/published.csv`` at the repository root that holds this package.

    Located from the package itself (not the working directory) so ``eqbench report`` run from
    anywhere uses the checkout's published numbers, like ``tasks/`` profiles are found.
    """
    return Path(__file__).resolve().parents[1] / "baselines" / "published.csv"


def load_baselines(path: Path | None = None) -> pandas.DataFrame:
    """The published numbers, or an empty table (with a warning) when the file is absent.

    A missing baselines file must not stop a report of measured results; the page then says that
    no published numbers were found.
    """
    import pandas as pd

    path = path or baselines_path()
    columns = ["source", "table", "system", "model", "metric", "value", "error", "unit", "convention", "note"]
    if not path.exists():
        warnings.warn(f"no published baselines at {path}; the report shows measured numbers only", stacklevel=2)
        return pd.DataFrame(columns=columns)
    return pd.read_csv(path, dtype={"error": "float64", "value": "float64"}, keep_default_na=False,
                       na_values={"value": [""], "error": [""]})


def _read_results(results_dir: Path) -> pandas.DataFrame:
    import pandas as pd

    csv = results_dir / "results.csv"
    if not csv.exists():
        raise EqbenchError(f"no results table at {csv}; run a task or `eqbench collect --results {results_dir}` first")
    table = pd.read_csv(csv, low_memory=False)
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


# -- number formatting ----------------------------------------------------------------------------


def _fmt(value: float, digits: int = 4) -> str:
    """Significant digits, not decimals: the table mixes seconds (1e-3) and NLLs (1e3)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits}g}"


def _pm(mean: float, std: float, n: int) -> str:
    """``mean ± std`` (std over n > 1 repeats), or the mean alone where there is one repeat."""
    if n > 1 and not math.isnan(std):
        return f"{_fmt(mean)} ± {_fmt(std, 2)}"
    return _fmt(mean)


# -- per-task tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSection:
    """What the report shows of one task.

    ``metrics``: headline metrics recorded without ``step``, averaged over seeds.
    ``round_metrics``: metrics whose ``step`` is a repeat (metastable-states' rounds), averaged over
    seeds and rounds together, as Table 1 reports mean ± std over rounds.
    ``axis_metrics``: metrics whose ``step`` is an x axis (divergence-cost's particle count N), kept
    per step and averaged over seeds; ``axis_label`` names the axis.
    ``baseline``: selects the rows of ``published.csv`` that belong beside this task.
    ``pair``: maps a published row to the measured (model, variant, metric) that measures the same
    quantity, or ``None``; those pairs get a side-by-side table (measured next to published).
    """

    task: str
    title: str
    paper: str
    conventions: str
    metrics: tuple[str, ...] = ()
    round_metrics: tuple[str, ...] = ()
    axis_metrics: tuple[str, ...] = ()
    axis_label: str = "step"
    baseline: Callable[[dict[str, Any]], bool] = field(default=lambda row: False)
    no_baseline: str = ""
    pair: Callable[[dict[str, Any]], tuple[str, str, str] | None] = field(default=lambda row: None)


_NLL_CONVENTION = (
    "NLL is −log q(x) in nats per configuration on the centre-of-mass-free subspace, including the "
    "Gaussian normalising constant ½(N−1)D·log 2π (5.514 for DW-4, 33.082 for LJ-13), scored with the "
    "exact divergence (SPEC §1). The paper's code left the constant out: add it to a paper NLL before "
    "comparing. The §7.4 likelihoods 10.85 / 11.40 are shown as printed: the paper does not say whether "
    "they are log q or −log q (baselines/README.md). The peer's (midgley2023) numbers use other data sets "
    "and, for LJ-13, the single-count LJ energy: shown beside, not comparable number for number."
)

def _pair_parameters(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """C.1-C.5 parameter counts are recorded under the same metric name by every training task."""
    return (row["model"], "", "n_parameters") if row["metric"] == "n_parameters" else None


#: Table 1's reference rows and the metastable-states method (``variant``) that reproduces each.
_TABLE1_METHODS = {"training-set": "training", "mcmc-short": "mcmc-short", "mcmc-long": "mcmc-long"}


def _pair_minima(row: dict[str, Any]) -> tuple[str, str, str] | None:
    """Table 1 / §7.5 rows -> metastable-states records.

    Bins are named ``distinct_minima_-80_-70`` in published.csv and ``distinct_minima_m80_m70`` in the
    records; §7.5's ``distinct_minima_found`` is the records' ``distinct_minima``. The reference
    methods (training set, short and long MCMC) are taken from the kernel flow's cells, which run
    them beside the flow; a flow row is the model's ``flow`` method.
    """
    metric = row["metric"]
    if metric == "distinct_minima_found":
        metric = "distinct_minima"
    elif metric.startswith("distinct_minima_"):
        metric = "distinct_minima_" + metric.removeprefix("distinct_minima_").replace("-inf", "minf").replace("-", "m")
    else:
        return None
    if row["model"] in _TABLE1_METHODS:
        return EQUIVARIANT_FLOW, _TABLE1_METHODS[row["model"]], metric
    return row["model"], "flow", metric


TASK_SECTIONS: tuple[TaskSection, ...] = (
    TaskSection(
        task="density-estimation",
        title="Density estimation: NLL vs training-set size",
        paper="§7.3, Fig. 5, 8, 9",
        conventions=_NLL_CONVENTION + " Variant 'aug': non-equivariant model trained with random rotations and "
                    "permutations of every batch.",
        metrics=("nll_train", "nll_test", "final_train_loss", "n_parameters"),
        baseline=lambda r: r["table"] == "§7.4" or r["metric"] == "nll_test" or r["metric"] == "n_parameters",
        pair=_pair_parameters,
    ),
    TaskSection(
        task="bg-reweighting",
        title="Boltzmann generator: reweighting to the target",
        paper="§7.4, B.3, Fig. 3b, 6, 10",
        conventions="Energies in kT (reduced units). ESS is Kish's (Σw)²/Σw² as a fraction of the finite "
                    "samples, log w = −u − log q. Mean energies of the flow samples, the reweighted samples and "
                    "the MCMC test set; the 'cell error' column is the mean over seeds of the bootstrap standard "
                    "deviation recorded in the cell. DW-2 free-energy RMSEs are against the exact profile, "
                    "reweighted with the exact log q ('reweighted') and with a one-probe Hutchinson log q "
                    "('hutchinson'). " + _NLL_CONVENTION,
        metrics=("ess_fraction", "ess_fraction_hutchinson", "mean_energy_flow", "mean_energy_reweighted",
                 "mean_energy_mcmc", "mean_energy_hutchinson", "free_energy_rmse_flow",
                 "free_energy_rmse_reweighted", "free_energy_rmse_hutchinson", "nll_train", "nll_test"),
        baseline=lambda r: r["table"] == "§7.4" or r["metric"] == "reverse_ess",
    ),
    TaskSection(
        task="metastable-states",
        title="Metastable states: distinct minima found",
        paper="§7.5, Table 1, Fig. 7",
        conventions="Counts of distinct minima after minimisation and sorted-distance clustering at ε: lower "
                    "bounds (§7.5), mean ± std over seeds and rounds (Table 1: over 10 rounds). LJ-13 bins "
                    "(−70, −60), (−80, −70), (−∞, −80) in the ordered-pair LJ energy (each pair counted twice) "
                    "that Table 1 uses. eqbench's decorrelated MCMC samples reach many more minima per sample than "
                    "the paper's single-chain trajectories, so compare the ordering of methods with Table 1, not "
                    "absolute counts. Variant = method (flow samples, training set, short and long MCMC).",
        round_metrics=("distinct_minima", "distinct_minima_m70_m60", "distinct_minima_m80_m70",
                       "distinct_minima_minf_m80", "new_minima", "lowest_minimum_energy"),
        baseline=lambda r: r["table"] in ("Table 1", "§7.5", "SPEC §2", "Fig. 7"),
        pair=_pair_minima,
    ),
    TaskSection(
        task="divergence-cost",
        title="Divergence: Hutchinson error and cost vs number of particles",
        paper="§7.1, Fig. 3a, 3c",
        conventions="Wall time (median, seconds) of one velocity + divergence evaluation on this machine; "
                    "Hutchinson relative error = mean |estimate − exact| / RMS exact divergence; exponents are "
                    "least-squares slopes in log-log space over the largest particle counts. Variant = method.",
        metrics=("time_exponent", "hutchinson_rel_error_exponent", "hutchinson_abs_error_exponent"),
        axis_metrics=("eval_time_s", "hutchinson_rel_error", "hutchinson_abs_error"),
        axis_label="N",
        no_baseline="The paper reports these results only as figures (Fig. 3a, 3c); there are no published "
                    "numbers to place beside them.",
    ),
    TaskSection(
        task="dto-vs-otd",
        title="Discretise-then-optimise vs optimise-then-discretise",
        paper="§7.2, Fig. 4",
        conventions="Test NLL: −log q in nats per configuration on the CoM-free subspace, Gaussian constant "
                    "included, exact divergence; both solvers' models are integrated by the same reference solver "
                    "(nll_test) and by their training solver (nll_test_train_solver). "
                    "NFE = function evaluations per training iteration; growth = last tenth / first tenth of "
                    "training. Variant = training solver.",
        metrics=("nll_test", "nll_test_train_solver", "nfe_first", "nfe_last", "nfe_growth",
                 "train_s_per_iteration"),
        no_baseline="The paper reports these results only as figures (Fig. 4a, 4b); there are no published "
                    "numbers to place beside them.",
    ),
    TaskSection(
        task="timing",
        title="Training and sampling time per iteration",
        paper="B.1, Table 2",
        conventions="Seconds per iteration at batch 64 on this machine (Table 2 prints seconds per 10 iterations "
                    "on a GTX 1080 Ti). Only ratios between models carry over between machines: "
                    "ratio = model time / kernel-flow time, measured in the same cell with interleaved epochs. "
                    "The published ratios below are computed from Table 2's seconds.",
        metrics=("train_iteration_s", "sample_iteration_s", "train_ratio_to_reference",
                 "sample_ratio_to_reference", "n_parameters"),
        baseline=lambda r: r["table"] == "Table 2",
        pair=_pair_parameters,
    ),
)

_ID_COLUMNS = ["system", "model", "variant", "n_train"]


def aggregate(rows: pandas.DataFrame, metrics: Sequence[str], *, keep_step: bool = False) -> pandas.DataFrame:
    """Mean, std and count of ``metrics`` per (system, model, variant, n_train[, step], metric).

    ``keep_step=False`` pools every step (seeds × rounds); ``True`` keeps ``step`` as a key (an x
    axis such as N). A metric ``m`` that has a companion ``m_std`` (a within-cell error, e.g. a
    bootstrap std) gets its mean as ``cell_error``, so a single-seed run still shows an error.
    Returned columns: the keys, ``metric``, ``mean``, ``std``, ``n``, ``cell_error``, ``unit``.
    """
    import pandas as pd

    keys = _ID_COLUMNS + (["step"] if keep_step else [])
    sel = rows[rows["metric"].isin(list(metrics))].copy()
    if sel.empty:
        return pd.DataFrame(columns=keys + ["metric", "mean", "std", "n", "cell_error", "unit"])
    sel["n_train"] = sel["n_train"].astype("Float64")
    grouped = sel.groupby(keys + ["metric"], dropna=False, sort=True)
    out = grouped["value"].agg(mean="mean", std="std", n="count").reset_index()
    out["unit"] = grouped["unit"].first().to_numpy()
    errs = rows[rows["metric"].isin([f"{m}_std" for m in metrics])].copy()
    if not errs.empty:
        errs["n_train"] = errs["n_train"].astype("Float64")
        errs["metric"] = errs["metric"].str.removesuffix("_std")
        err = errs.groupby(keys + ["metric"], dropna=False)["value"].mean().rename("cell_error").reset_index()
        out = out.merge(err, on=keys + ["metric"], how="left")
    else:
        out["cell_error"] = float("nan")
    order = {m: i for i, m in enumerate(metrics)}
    out["_order"] = out["metric"].map(order)
    return out.sort_values(keys + ["_order"], kind="mergesort").drop(columns="_order").reset_index(drop=True)


@dataclass
class HtmlTable:
    """A table ready for the template: header cells and rows of strings (escaped by jinja2)."""

    caption: str
    header: list[str]
    rows: list[list[str]]


def _wide(agg: pandas.DataFrame, order: Sequence[str], caption: str, *,
          step_label: str | None = None) -> HtmlTable | None:
    """One row per (system, model, variant, n_train[, step]), one column per metric in ``order``.

    Wide because a reader compares models along a row; the unit goes into the column header.
    """
    if agg.empty:
        return None
    keys = _ID_COLUMNS + (["step"] if step_label else [])
    present = set(agg["metric"])
    metrics = [m for m in order if m in present]
    # A unit shared by every row goes into the header; a unit that differs between rows (the
    # solver named in dto-vs-otd's nll_test_train_solver) stays with each value.
    unit_sets = {m: set(agg.loc[agg["metric"] == m, "unit"].fillna("").astype(str)) for m in metrics}
    units = {m: next(iter(u)) if len(u) == 1 else "" for m, u in unit_sets.items()}
    has_err = {m: bool(agg.loc[agg["metric"] == m, "cell_error"].notna().any()) for m in metrics}
    header = ["system", "model", "variant", "n_train"] + ([step_label] if step_label else [])
    for m in metrics:
        header.append(f"{m} [{units[m]}]" if units[m] else m)
        if has_err[m]:
            header.append(f"{m}: cell error")
    header.append("repeats")
    rows: list[list[str]] = []
    for key, group in agg.groupby(keys, dropna=False, sort=False):
        by_metric = {r["metric"]: r for _, r in group.iterrows()}
        cells = [_key_text(k) for k in key]
        n_max = 0
        for m in metrics:
            r = by_metric.get(m)
            text = "–" if r is None else _pm(float(r["mean"]), float(r["std"]), int(r["n"]))
            if r is not None and len(unit_sets[m]) > 1 and r["unit"]:
                text += f" [{r['unit']}]"
            cells.append(text)
            if has_err[m]:
                cells.append("–" if r is None else _fmt(float(r["cell_error"]), 2))
            if r is not None:
                n_max = max(n_max, int(r["n"]))
        cells.append(str(n_max))
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


def _side_by_side(rows: pandas.DataFrame, baselines: pandas.DataFrame, section: TaskSection) -> HtmlTable | None:
    """Published numbers next to the measured numbers of the same quantity (``section.pair``).

    Measured values are pooled over seeds (and rounds, where the metric is stepped by round), as
    the published ones are means over the paper's repeats.
    """
    if baselines.empty or rows.empty:
        return None
    out = []
    for r in baselines.to_dict("records"):
        if not section.baseline(r):
            continue
        target = section.pair(r)
        if target is None:
            continue
        model, variant, metric = target
        m = rows[(rows["system"] == r["system"]) & (rows["model"] == model) & (rows["variant"] == variant)
                 & (rows["metric"] == metric)]["value"].astype(float)
        if m.empty:
            continue
        err = r.get("error")
        published = _fmt(float(r["value"]))
        if err is not None and not (isinstance(err, float) and math.isnan(err)):
            published = f"{published} ± {_fmt(float(err), 3)}"
        label = model + (f" ({variant})" if variant else "")
        out.append([r["system"], f"{r['model']} → {label}", metric, _pm(float(m.mean()), float(m.std()), len(m)),
                    str(len(m)), published, f"{r['source']}, {r['table']}", r["convention"]])
    if not out:
        return None
    return HtmlTable(caption="Side by side: measured here vs published (same quantity)",
                     header=["system", "published row → measured model (variant)", "metric", "measured",
                             "repeats", "published", "source", "published convention"], rows=out)


def _baseline_table(baselines: pandas.DataFrame, section: TaskSection, systems: set[str]) -> HtmlTable | None:
    """Every published row that belongs beside ``section``, for the systems the task measured."""
    if baselines.empty:
        return None
    picked = [r for r in baselines.to_dict("records") if section.baseline(r) and r["system"] in systems]
    if not picked:
        return None
    rows = []
    for r in picked:
        err = r.get("error")
        value = _fmt(float(r["value"]))
        if err is not None and not (isinstance(err, float) and math.isnan(err)):
            value = f"{value} ± {_fmt(float(err), 3)}"
        rows.append([r["source"], r["table"], r["system"], r["model"], r["metric"], value, r["unit"],
                     r["convention"], r["note"]])
    return HtmlTable(caption="Published numbers (baselines/published.csv)",
                     header=["source", "table", "system", "model", "metric", "value", "unit", "convention", "note"],
                     rows=rows)


def _timing_ratio_table(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> HtmlTable | None:
    """Measured ratios to the kernel flow beside Table 2's ratios, computed from its seconds."""
    t2 = baselines[baselines["table"] == "Table 2"] if not baselines.empty else baselines
    measured = ok[(ok["task"] == "timing") & ok["metric"].isin(["train_ratio_to_reference", "sample_ratio_to_reference"])]
    if measured.empty:
        return None
    kinds = {"train": "train_time_10_iterations_s", "sample": "sample_time_10_iterations_s"}
    rows = []
    systems = sorted(set(measured["system"]))
    models = sorted(set(t2["model"]) | set(measured["model"]))
    for system in systems:
        for model in models:
            if model == EQUIVARIANT_FLOW:
                continue
            cells = [system, model]
            present = False
            for kind, pub_metric in kinds.items():
                m = measured[(measured["system"] == system) & (measured["model"] == model)
                             & (measured["metric"] == f"{kind}_ratio_to_reference")]["value"]
                cells.append(_pm(float(m.mean()), float(m.std()), len(m)) if len(m) else "–")
                pub = t2[(t2["system"] == system) & (t2["metric"] == pub_metric)].set_index("model")["value"]
                if model in pub.index and EQUIVARIANT_FLOW in pub.index:
                    cells.append(_fmt(float(pub[model]) / float(pub[EQUIVARIANT_FLOW]), 3))
                    present = True
                else:
                    cells.append("–")
                present = present or len(m) > 0
            if present:
                rows.append(cells)
    if not rows:
        return None
    return HtmlTable(caption="Ratio to the kernel flow: measured here vs Table 2 (ratio of its seconds)",
                     header=["system", "model", "train: measured", "train: Table 2",
                             "sample: measured", "sample: Table 2"], rows=rows)


# -- claims ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimResult:
    """A verdict (one of :data:`VERDICTS`) and one sentence of evidence quoting the numbers used."""

    verdict: str
    evidence: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims and the function that judges it from the ok rows of the table."""

    key: str
    statement: str
    paper: str
    check: Callable[[pandas.DataFrame, pandas.DataFrame], ClaimResult]


def _mean(rows: pandas.DataFrame, **where: Any) -> tuple[float, float, int]:
    sel = rows
    for col, val in where.items():
        sel = sel[sel[col] == val]
    vals = sel["value"].astype(float)
    return float(vals.mean()) if len(vals) else math.nan, float(vals.std()) if len(vals) > 1 else math.nan, len(vals)


def _non_equivariant(rows: pandas.DataFrame) -> list[str]:
    """Models that a task ran with an ``aug`` variant: the tasks augment non-equivariant models only
    (equivariant likelihoods are invariant), so the table itself says which models are not equivariant."""
    return sorted(rows.loc[rows["variant"] == "aug", "model"].unique())


def claim_generalisation(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """Equivariant flows generalise from few samples (§7.3, Fig. 5).

    Per system, at the smallest ``n_train`` where the kernel flow has a test NLL: reproduced when
    its test NLL is lower than that of every non-equivariant model variant (with and without
    augmentation) at that size, and its train–test gap (test − train NLL) is at most 1 nat per
    configuration or smaller than every non-augmented non-equivariant model's gap (these overfit
    a few samples: their gap is the failure the paper shows). All systems measured must pass.
    """
    rows = ok[(ok["task"] == "density-estimation") & ok["metric"].isin(["nll_test", "nll_train"])]
    kf = rows[rows["model"] == EQUIVARIANT_FLOW]
    neq = _non_equivariant(rows)
    if kf.empty or not neq:
        return ClaimResult(NOT_MEASURED, "needs density-estimation rows of the kernel flow and of a non-equivariant "
                                         "model (node, real-nvp) with and without augmentation.")
    parts, passed = [], True
    for system in sorted(kf["system"].unique()):
        ks = kf[(kf["system"] == system) & (kf["metric"] == "nll_test")]
        others = rows[(rows["system"] == system) & rows["model"].isin(neq) & (rows["metric"] == "nll_test")]
        common = sorted(set(ks["n_train"].dropna()) & set(others["n_train"].dropna()))
        if not common:
            continue
        n = common[0]
        k_test, _, _ = _mean(ks, n_train=n)
        k_train, _, _ = _mean(kf[(kf["system"] == system) & (kf["metric"] == "nll_train")], n_train=n)
        gap = k_test - k_train
        sys_rows = rows[(rows["system"] == system) & (rows["n_train"] == n)]
        comps, beaten, gaps = [], True, []
        for (model, variant), g in sys_rows[sys_rows["model"].isin(neq)].groupby(["model", "variant"]):
            o_test, _, _ = _mean(g, metric="nll_test")
            o_train, _, _ = _mean(g, metric="nll_train")
            label = model + (f" ({variant})" if variant else "")
            comps.append(f"{label} {_fmt(o_test)}")
            beaten = beaten and k_test < o_test
            if not variant:
                gaps.append(o_test - o_train)
        gap_ok = gap <= 1.0 or (bool(gaps) and all(gap < g for g in gaps))
        passed = passed and beaten and gap_ok
        parts.append(f"{system}, n_train={int(n)}: kernel-flow test NLL {_fmt(k_test)} (gap {_fmt(gap, 2)}) vs "
                     + ", ".join(comps) + ("" if beaten else " — not the lowest")
                     + ("" if gap_ok else " — gap too large"))
    if not parts:
        return ClaimResult(NOT_MEASURED, "no training-set size where both the kernel flow and a non-equivariant "
                                         "model were scored.")
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, "; ".join(parts) + ".")


def claim_reweighting(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """Reweighting works for equivariant flows only (§7.4, Fig. 6, 10).

    Per system: reproduced when the kernel flow's reweighted mean energy agrees with the MCMC mean
    within 3 combined bootstrap standard deviations (sqrt(σ_rw² + σ_mcmc²)), or within 0.05 kT,
    *and* its ESS fraction exceeds that of every non-equivariant model variant measured on the
    system (the paper's non-equivariant flows reweight with a handful of effective samples). A
    system without non-equivariant rows is judged on the agreement alone. All systems must pass.
    """
    rows = ok[(ok["task"] == "bg-reweighting") & ok["step"].isna()]
    kf = rows[rows["model"] == EQUIVARIANT_FLOW]
    if kf.empty or kf[kf["metric"] == "mean_energy_reweighted"].empty:
        return ClaimResult(NOT_MEASURED, "needs bg-reweighting rows of the kernel flow.")
    neq = _non_equivariant(rows)
    parts, passed = [], True
    for system in sorted(kf["system"].unique()):
        k = kf[kf["system"] == system]
        rw, _, _ = _mean(k, metric="mean_energy_reweighted")
        rw_s, _, _ = _mean(k, metric="mean_energy_reweighted_std")
        mc, _, _ = _mean(k, metric="mean_energy_mcmc")
        mc_s, _, _ = _mean(k, metric="mean_energy_mcmc_std")
        ess, _, _ = _mean(k, metric="ess_fraction")
        if math.isnan(rw) or math.isnan(mc):
            continue
        sigma = math.hypot(rw_s if not math.isnan(rw_s) else 0.0, mc_s if not math.isnan(mc_s) else 0.0)
        diff = abs(rw - mc)
        agree = diff <= max(3 * sigma, 0.05)
        others = []
        ess_ok = True
        for (model, variant), g in rows[(rows["system"] == system) & rows["model"].isin(neq)].groupby(["model", "variant"]):
            o_ess, _, _ = _mean(g, metric="ess_fraction")
            others.append(f"{model}{' (' + variant + ')' if variant else ''} ESS {_fmt(o_ess, 2)}")
            ess_ok = ess_ok and ess > o_ess
        passed = passed and agree and ess_ok
        nsig = f"{diff / sigma:.1f}σ" if sigma > 0 else "σ unknown"
        parts.append(f"{system}: kernel-flow reweighted ⟨u⟩ {_fmt(rw)} vs MCMC {_fmt(mc)} (|Δ| {_fmt(diff, 2)} kT, "
                     f"{nsig}), ESS {_fmt(ess, 2)}" + (f" vs {', '.join(others)}" if others else "")
                     + ("" if agree else " — disagrees") + ("" if ess_ok else " — ESS not the highest"))
    if not parts:
        return ClaimResult(NOT_MEASURED, "the kernel flow's bg-reweighting rows lack mean energies.")
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, "; ".join(parts) + ".")


def claim_dw4_minima(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """The equivariant flow trained on one DW-4 minimum finds all five minima (§7.5, Fig. 7a).

    Reproduced when the kernel flow's ``flow`` method finds 5 distinct minima in every round of
    every seed on ``dw4``. The non-equivariant flows' counts (the paper: 1) are quoted beside.
    """
    rows = ok[(ok["task"] == "metastable-states") & (ok["system"] == "dw4") & (ok["variant"] == "flow")
              & (ok["metric"] == "distinct_minima")]
    k = rows[rows["model"] == EQUIVARIANT_FLOW]["value"].astype(float)
    if k.empty:
        return ClaimResult(NOT_MEASURED, "needs metastable-states rows of the kernel flow on dw4 (method 'flow').")
    others = [f"{m}: {_fmt(g['value'].mean(), 3)} (min {_fmt(g['value'].min())}, max {_fmt(g['value'].max())})"
              for m, g in rows[rows["model"] != EQUIVARIANT_FLOW].groupby("model")]
    verdict = REPRODUCED if (k == 5).all() else NOT_REPRODUCED
    text = (f"kernel-flow found {', '.join(_fmt(v) for v in k)} distinct minima in its {len(k)} rounds "
            f"(all five in every round: {'yes' if verdict == REPRODUCED else 'no'})")
    if others:
        text += "; non-equivariant flows, mean over rounds: " + "; ".join(others) + " (paper: 1)"
    return ClaimResult(verdict, text + ".")


def claim_exact_divergence(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """Exact divergence is needed for reweighting (§7.1, Fig. 3b).

    On DW-2, for every continuous flow with both records: reproduced when the free-energy RMSE of
    the profile reweighted with the exact log q is smaller than with the one-probe Hutchinson log q
    of the same samples (averaged over seeds), for every such model.
    """
    rows = ok[(ok["task"] == "bg-reweighting") & ok["step"].isna()
              & ok["metric"].isin(["free_energy_rmse_reweighted", "free_energy_rmse_hutchinson"])]
    parts, passed = [], True
    for (system, model, variant), g in rows.groupby(["system", "model", "variant"]):
        exact, _, _ = _mean(g, metric="free_energy_rmse_reweighted")
        hutch, _, _ = _mean(g, metric="free_energy_rmse_hutchinson")
        if math.isnan(exact) or math.isnan(hutch):
            continue
        passed = passed and exact < hutch
        label = model + (f" ({variant})" if variant else "")
        parts.append(f"{system} {label}: RMSE exact {_fmt(exact, 3)} vs Hutchinson {_fmt(hutch, 3)} kT")
    if not parts:
        return ClaimResult(NOT_MEASURED, "needs bg-reweighting rows on dw2 with free_energy_rmse_reweighted and "
                                         "free_energy_rmse_hutchinson (continuous flows).")
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, "; ".join(parts) + ".")


def claim_kernel_fastest(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """The kernel flow trains and samples fastest (B.1, Table 2).

    The paper compares it with the equivariant gradient flows of Table 2 (the models Table 2 lists
    beside the kernel flow in ``published.csv``; ``gradient-flow`` and ``schnet-flow`` when the
    baselines file is missing). Reproduced when every such model measured has training and sampling
    ratios to the kernel flow above 1 on every system. Other models' ratios (e.g. the
    non-equivariant nODE, which Table 2 does not list) are quoted but do not decide the verdict.
    """
    rows = ok[(ok["task"] == "timing") & ok["metric"].isin(["train_ratio_to_reference", "sample_ratio_to_reference"])]
    if not baselines.empty:
        compared = sorted(set(baselines.loc[baselines["table"] == "Table 2", "model"]) - {EQUIVARIANT_FLOW})
    else:
        compared = ["gradient-flow", "schnet-flow"]
    decisive = rows[rows["model"].isin(compared)]
    if decisive.empty:
        return ClaimResult(NOT_MEASURED, f"needs timing rows of {' and '.join(compared)} (ratios to the kernel flow).")
    parts, passed, extra = [], True, []
    for (system, model), g in rows[rows["model"] != EQUIVARIANT_FLOW].groupby(["system", "model"]):
        tr, _, _ = _mean(g, metric="train_ratio_to_reference")
        sr, _, _ = _mean(g, metric="sample_ratio_to_reference")
        text = f"{system} {model} train ×{_fmt(tr, 3)}, sample ×{_fmt(sr, 3)}"
        if model in compared:
            passed = passed and tr > 1 and sr > 1
            parts.append(text)
        else:
            extra.append(text)
    sentence = "slower than the kernel flow by: " + "; ".join(parts)
    if extra:
        sentence += " (not in Table 2, not decisive: " + "; ".join(extra) + ")"
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, sentence + ".")


#: The paper's claims in the order the issue lists them.
CLAIMS: tuple[Claim, ...] = (
    Claim("generalisation", "Equivariant flows generalise from few samples", "§7.3, Fig. 5", claim_generalisation),
    Claim("reweighting", "Reweighting works for equivariant flows only", "§7.4, Fig. 6, 10", claim_reweighting),
    Claim("dw4-minima", "All five DW-4 minima found by the equivariant flow", "§7.5, Fig. 7a", claim_dw4_minima),
    Claim("exact-divergence", "Exact divergence is needed for reweighting", "§7.1, Fig. 3b", claim_exact_divergence),
    Claim("kernel-fastest", "The kernel flow is the fastest to train and sample", "B.1, Table 2",
          claim_kernel_fastest),
)


def evaluate_claims(table: pandas.DataFrame, baselines: pandas.DataFrame | None = None) -> list[tuple[Claim, ClaimResult]]:
    """Every claim's verdict from the ok rows of ``table``; a check that raises is ``not measured``
    with the error named, so one malformed task never hides the other verdicts.

    Every check receives the published numbers too (only the timing claim uses them: Table 2
    names the models the kernel flow was compared with)."""
    ok = _ok(table)
    baselines = load_baselines() if baselines is None else baselines
    results = []
    for claim in CLAIMS:
        try:
            res = claim.check(ok, baselines)
        except Exception as exc:  # noqa: BLE001  (report the broken check, keep the page)
            res = ClaimResult(NOT_MEASURED, f"the check failed on this table: {type(exc).__name__}: {exc}")
        results.append((claim, res))
    return results


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


def _figures(task: str, table: pandas.DataFrame, work_dir: Path, index: int) -> tuple[list[Figure], str]:
    """The task's figures as inline SVG, drawn from ``table`` into ``work_dir`` (a temp dir).

    Returns the figures and a note: why there are none, if there are none.
    """
    from eqbench.plots import write_task_plots

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_task_plots(task, work_dir, table=table)
    svgs = sorted(p for p in paths if p.suffix == ".svg")
    figs = [Figure(p.stem, inline_svg(p.read_text(encoding="utf-8"), f"t{index}f{i}-")) for i, p in enumerate(svgs)]
    note = ""
    if not figs:
        failed = [str(w.message) for w in caught if "plotting task" in str(w.message)]
        note = failed[0] if failed else "this task drew no figure from these rows"
    return figs, note


# -- provenance -----------------------------------------------------------------------------------

_PROVENANCE_COLUMNS = ("git_sha", "eqbench_version", "torch_version", "python_version", "numpy_version",
                       "device", "threads", "hostname", "platform", "profile")


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
</style>
</head>
<body>
<h1>eqbench report</h1>
<p class="muted">Results: <code>{{ results_dir }}</code> — {{ n_cells }} cells, {{ n_records }} records.
Reproducing Köhler, Klein &amp; Noé, “Equivariant Flows: Exact Likelihood Generative Learning for Symmetric
Densities”, ICML 2020. Generated {{ generated }} from <code>results.csv</code> and
<code>baselines/published.csv</code> only.</p>

<nav><strong>Contents:</strong> <a href="#claims">claims</a> · <a href="#failed-cells">failed cells</a>
{% for s in sections %} · <a href="#task-{{ s.task }}">{{ s.task }}</a>{% endfor %} · <a href="#provenance">provenance</a>
</nav>

<section id="claims">
<h2>The paper's claims</h2>
<table class="claims">
<caption>Verdicts computed from the measured numbers of this run</caption>
<thead><tr><th>claim</th><th>paper</th><th>verdict</th><th>evidence</th></tr></thead>
<tbody>
{% for claim, res in claims %}
<tr id="claim-{{ claim.key }}"><td>{{ claim.statement }}</td><td>{{ claim.paper }}</td>
<td class="verdict {{ res.verdict | replace(' ', '-') }}">{{ res.verdict }}</td><td>{{ res.evidence }}</td></tr>
{% endfor %}
</tbody>
</table>
<p class="muted">How each verdict is decided (thresholds) is documented in <code>eqbench/report.py</code>
(one function per claim). “not measured”: the rows the check needs are absent from this results table.</p>
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

{% for s in sections %}
<section id="task-{{ s.task }}" class="task">
<h2>{{ s.title }} <span class="muted">({{ s.task }}; paper {{ s.paper }})</span></h2>
{% if s.empty %}
<p class="muted">No results of this task in this results table.</p>
{% else %}
<div class="conventions"><strong>Conventions.</strong> {{ s.conventions }}</div>
{% for fig in s.figures %}
<figure>{{ fig.svg | safe }}<figcaption>{{ s.task }}: {{ fig.name }}</figcaption></figure>
{% else %}
<p class="muted">No figure: {{ s.figure_note }}.</p>
{% endfor %}
{% for t in s.tables %}
{{ data_table(t, 'results') }}
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


def _section_context(section: TaskSection, table: pandas.DataFrame, baselines: pandas.DataFrame,
                     work_dir: Path, index: int) -> dict[str, Any]:
    ok = _ok(table)
    rows = ok[ok["task"] == section.task]
    ctx: dict[str, Any] = {"task": section.task, "title": section.title, "paper": section.paper,
                           "conventions": section.conventions, "no_baseline": section.no_baseline,
                           "empty": rows.empty, "figures": [], "figure_note": "", "tables": [], "published": []}
    if rows.empty:
        return ctx
    ctx["figures"], ctx["figure_note"] = _figures(section.task, table, work_dir, index)
    tables = []
    if section.metrics:
        flat = rows[rows["step"].isna()]
        tables.append(_wide(aggregate(flat, section.metrics), section.metrics,
                            "Measured: mean ± std over seeds (repeats = seeds)"))
    if section.round_metrics:
        tables.append(_wide(aggregate(rows, section.round_metrics), section.round_metrics,
                            "Measured: mean ± std over seeds × rounds (repeats = rounds)"))
    if section.axis_metrics:
        stepped = rows[rows["step"].notna()]
        tables.append(_wide(aggregate(stepped, section.axis_metrics, keep_step=True), section.axis_metrics,
                            f"Measured per {section.axis_label}: mean ± std over seeds",
                            step_label=section.axis_label))
    ctx["tables"] = [t for t in tables if t is not None]
    published = [_side_by_side(rows, baselines, section),
                 _baseline_table(baselines, section, set(rows["system"].astype(str)))]
    if section.task == "timing":
        published.insert(0, _timing_ratio_table(ok, baselines))
    ctx["published"] = [t for t in published if t is not None]
    return ctx


def _failed_rows(table: pandas.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["task", "system", "model", "variant", "n_train", "seed", "cell_id", "started", "reason"]
    failed = table[(table["status"] == "failed") | (table["metric"] == "cell_failed")]
    failed = failed.drop_duplicates("cell_id") if "cell_id" in failed.columns else failed
    rows = []
    for r in failed.to_dict("records"):
        rows.append([_key_text(r.get(c)) for c in ("task", "system", "model", "variant", "n_train", "seed",
                                                    "cell_id", "started_at")] + [str(r.get("reason") or "(no reason)")])
    return header, rows


def render_report(results_dir: Path | str, *, baselines: pandas.DataFrame | None = None) -> str:
    """The report of ``results_dir`` as one HTML string (see the module docstring)."""
    import datetime as dt

    import jinja2

    results_dir = Path(results_dir)
    table = _read_results(results_dir)
    baselines = load_baselines() if baselines is None else baselines
    known = {s.task for s in TASK_SECTIONS}
    with tempfile.TemporaryDirectory(prefix="eqbench-report-") as tmp:
        sections = [_section_context(s, table, baselines, Path(tmp), i) for i, s in enumerate(TASK_SECTIONS)]
    failed_header, failed = _failed_rows(table)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(_TEMPLATE).render(
        results_dir=str(results_dir),
        n_cells=int(table["cell_id"].nunique()) if "cell_id" in table.columns else len(table),
        n_records=len(table),
        generated=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        claims=evaluate_claims(table, baselines),
        failed=failed,
        failed_header=failed_header,
        sections=sections,
        other_tasks=sorted(set(table["task"].dropna().astype(str)) - known),
        provenance=_provenance(table),
    )


def write_report(results_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render the report of ``results_dir`` and write it atomically to ``out``
    (default ``results_dir/report.html``); returns the path written."""
    from eqbench.atomic import atomic_write_text

    results_dir = Path(results_dir)
    out_path = Path(out) if out is not None else results_dir / "report.html"
    html = render_report(results_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, html)
    return out_path
