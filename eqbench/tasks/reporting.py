"""What a task reports, declared by the task (DESIGN "A task owns its whole story").

A task says what the report shows of it by returning a :class:`TaskSection` from
:meth:`eqbench.tasks.base.Task.report_section`: its headline metrics and how their rows
aggregate, the conventions its numbers follow, which published rows sit beside them and how they
pair with measured rows, extra tables, and the paper's claims its rows decide (:class:`Claim`).
:mod:`eqbench.report` only iterates over the registered tasks and renders these declarations.

The unit of aggregation everywhere is the **settings key**: the hash of a cell's whole config
without its seed (task, model, system, profile, every parameter, code version). Numbers of
different settings keys are never averaged; numbers of one key are averaged over its seeds only.
:func:`with_settings` adds the columns this needs to any results table (deriving them from
``config_json`` for tables collected before ``settings_key`` was a column).

This module is low-level: it imports nothing above :mod:`eqbench.records` (no torch, no
matplotlib, never :mod:`eqbench.api` or :mod:`eqbench.report`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eqbench.records import cell_id

if TYPE_CHECKING:
    import pandas

__all__ = [
    "NLL_CONVENTION",
    "SAMPLE_METRIC_CONVENTION",
    "NOT_MEASURED",
    "NOT_REPRODUCED",
    "NO_VERDICT",
    "REPRODUCED",
    "VERDICTS",
    "VERDICT_PROFILES",
    "Claim",
    "ClaimResult",
    "HtmlTable",
    "Point",
    "TaskSection",
    "capabilities_known",
    "concat_rows",
    "describe",
    "draw_curves",
    "fmt",
    "has_capability",
    "is_equivariant_flow",
    "pm",
    "point",
    "seed_stats",
    "short_name",
    "settings_name",
    "with_settings",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_MEASURED = "not measured"
#: The verdict of a claim on a profile that decides nothing (smoke, calibrate); shown as
#: ``no verdict (smoke profile)``.
NO_VERDICT = "no verdict"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_MEASURED, NO_VERDICT)

#: Profiles whose numbers may decide a claim. ``smoke`` (a few iterations, a plumbing check) and
#: ``calibrate`` (cost measurement) are shown in tables and figures but judge nothing.
VERDICT_PROFILES: tuple[str, ...] = ("quick", "paper")

#: Order of profiles on the page; profiles not listed follow, sorted.
PROFILE_ORDER = ("paper", "quick", "smoke", "calibrate")

#: Why a profile decides nothing, shown where its rows are.
NO_VERDICT_WHY = {
    "smoke": "a plumbing check (a few iterations, tiny data)",
    "calibrate": "a cost calibration (sized to time the phases, not to converge)",
}


def profiles_in_order(rows: pandas.DataFrame) -> list[str]:
    """The profiles present in ``rows``, in :data:`PROFILE_ORDER`, others after them sorted."""
    present = set(rows["profile"].astype(str)) if "profile" in rows.columns else {""}
    return [p for p in PROFILE_ORDER if p in present] + sorted(present - set(PROFILE_ORDER))


def no_verdict_note(profile: str) -> str:
    """Why ``profile``'s numbers decide no claim, as the report shows it beside them."""
    why = NO_VERDICT_WHY.get(profile, "not a profile a verdict may rest on")
    return (f"Profile {profile or '(none)'}: {why}; its numbers give no verdict (claims are judged on "
            f"{' and '.join(VERDICT_PROFILES)} only).")

#: The NLL convention shared by the tasks that score likelihoods (SPEC §1).
NLL_CONVENTION = (
    "NLL is −log q(x) in nats per configuration on the centre-of-mass-free subspace, including the "
    "Gaussian normalising constant ½(N−1)D·log 2π (5.514 for DW-4, 33.082 for LJ-13), scored with the "
    "exact divergence (SPEC §1). The paper's code left the constant out: add it to a paper NLL before "
    "comparing. The §7.4 likelihoods 10.85 / 11.40 are shown as printed: the paper does not say whether "
    "they are log q or −log q (baselines/README.md). The peer's (midgley2023) numbers use other data sets "
    "and, for LJ-13, the single-count LJ energy: shown beside, not comparable number for number. "
    "kl_test = NLL_test − H(p), the forward KL(p‖q) ≥ 0 in nats: H(p) = ⟨u⟩ of the test split + log Z on "
    "the same subspace, log Z by forward annealed importance sampling (LJ-55: with resampling, SMC; cached "
    "per machine; a lower bound, the unit names the estimator and the forward/reverse gap), "
    "kl_test_stderr its standard error (NLL, log Z and ⟨u⟩ in quadrature)."
)

#: What the sample-quality metrics mean, for the conventions text of every report section that shows them.
SAMPLE_METRIC_CONVENTION = (
    "energy_w1 / energy_w2: W1 / W2 between the energy distributions of the flow samples (of finite energy; "
    "'reweighted': importance-weighted) and the MCMC test set, in kT, the distance itself (not squared). "
    "dist_tv: total variation ½Σ|p−q| between the histograms of all interatomic distances, 200 bins over the "
    "test set's range (iDEM's definition), sample mass outside the range counted fully, in [0, 1]. "
    "coord_w2: 2-Wasserstein distance between the configuration distributions, exact OT with cost the squared "
    "Euclidean distance of the flattened coordinates (summed over particles), reported as W2 (not squared) in "
    "reduced length; coord_w2_aligned: the same with every pair first aligned over permutations and "
    "rotations/reflections (alternating Hungarian/Kabsch, a heuristic upper bound); both on the subsample sizes "
    "their unit names, and biased upwards for finite sets, so compare at equal sizes.")

#: Columns that identify a row on the page besides its settings; the ``settings`` label names
#: what else differs between settings keys that share them.
DISPLAY_KEYS: tuple[str, ...] = ("task", "system", "model", "variant", "n_train", "profile")


# -- declarations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One measured number a claim rests on, for the claim's figure: mean ± std across seeds of
    one settings key, and the paper's number for the same quantity where one exists."""

    label: str
    mean: float
    std: float = math.nan
    n_seeds: int = 1
    published: float | None = None


@dataclass(frozen=True)
class ClaimResult:
    """A verdict (one of :data:`VERDICTS`), one sentence of evidence quoting the numbers used
    (with their seeds, spread and settings), and the numbers themselves for the figure
    (``points``, in the unit ``quantity``)."""

    verdict: str
    evidence: str
    points: tuple[Point, ...] = ()
    quantity: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims and the function that judges it.

    ``check(ok_rows, baselines)`` receives the ok rows of the results table of *one* profile
    (with the :func:`with_settings` columns) and the published numbers. ``needs``: the model
    capabilities the check selects rows by; when the table does not record capabilities the
    report answers ``not measured: capabilities not recorded`` without calling the check.
    ``source``: the publication that makes the claim, as ``baselines/published.csv`` names it
    (``kohler2020`` for the paper eqbench reproduces; a peer's claim, e.g. ``midgley2023``,
    is judged the same way).
    """

    key: str
    statement: str
    paper: str
    check: Callable[[pandas.DataFrame, pandas.DataFrame], ClaimResult]
    needs: tuple[str, ...] = ()
    source: str = "kohler2020"


@dataclass
class HtmlTable:
    """A table ready for the report's template: header cells and rows of strings (escaped when
    rendered)."""

    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class TaskSection:
    """What the report shows of one task.

    ``metrics``: headline metrics recorded without ``step``, mean ± std across the seeds of each
    settings key. ``round_metrics``: metrics whose ``step`` is a repeat (metastable-states'
    rounds), pooled over seeds and rounds of one settings key, as Table 1 reports mean ± std
    over rounds. ``axis_metrics``: metrics whose ``step`` is an x axis (divergence-cost's particle
    count N), kept per step; ``axis_label`` names the axis.
    ``baseline``: selects the rows of ``published.csv`` that belong beside this task.
    ``pair``: maps a published row to the measured (model, variant, metric) that measures the same
    quantity, or ``None``; those pairs get a side-by-side table (one row per settings key). A fourth
    element ``{column: number}`` keeps only the measured rows at those values (a published NLL at
    ``n_train`` = 1,000 sits beside the cells trained on 1,000 configurations only).
    ``extra_tables(ok_rows, baselines)``: more tables beside the published ones (timing's ratios).
    ``claims``: the paper's claims this task's rows decide. ``order``: position on the page.
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
    pair: Callable[[dict[str, Any]], tuple[str, str, str] | tuple[str, str, str, dict[str, float]] | None] = field(
        default=lambda row: None)
    extra_tables: Callable[[pandas.DataFrame, pandas.DataFrame], list[HtmlTable]] | None = None
    claims: tuple[Claim, ...] = ()
    order: float = 100.0


# -- settings keys --------------------------------------------------------------------------------


def _config(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        cfg = json.loads(text)
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) else None


def _flat(cfg: dict[str, Any]) -> dict[str, str]:
    """The settings of a config as ``name -> value text``: ``params`` by their own names, the code
    version as ``code.<key>``, any other top-level entry (not the identifying ones) by its name."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        if key in ("task", "model", "system", "profile", "seed"):
            continue
        if key == "params" and isinstance(value, dict):
            out.update({k: json.dumps(v, sort_keys=True) for k, v in value.items()})
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": json.dumps(v, sort_keys=True) for k, v in value.items()})
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


def _derived_key(row: dict[str, Any]) -> str:
    cfg = _config(row.get("config_json"))
    if cfg is not None:
        return cell_id({k: v for k, v in cfg.items() if k != "seed"})
    # No config at all (a hand-made table): the identifying columns are all there is.
    ident = {k: ("" if _missing(row.get(k)) else str(row.get(k))) for k in DISPLAY_KEYS}
    return cell_id(ident)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, pd.NA
    except (TypeError, ValueError):
        return False


def with_settings(table: pandas.DataFrame) -> pandas.DataFrame:
    """``table`` with the columns every grouping of the report needs (a copy; idempotent):

    * ``settings_key``: kept where recorded, else :func:`~eqbench.records.cell_id` of
      ``config_json`` without ``seed`` (older tables), else a hash of the display columns;
    * ``capabilities``: kept where recorded (``"cnf;equivariant;trainable"``), else ``""``
      (unknown: claims that select by capability then say so);
    * ``profile``, ``variant``, ``unit``: strings, ``""`` when absent;
    * ``settings``: the parameters that differ between the settings keys that share task, system,
      model, variant and profile, other than n_train (a column of its own), as
      ``"lr=0.001, code.git=abc"``; ``""`` when nothing else differs.
    """
    out = table.copy()
    for col in ("profile", "variant", "capabilities", "settings_key", "unit"):
        if col not in out.columns:
            out[col] = ""
        out[col] = out[col].astype(object).where(out[col].notna(), "").astype(str)
    if out.empty:
        out["settings"] = ""
        return out
    absent = out["settings_key"] == ""
    if absent.any():
        out.loc[absent, "settings_key"] = [_derived_key(r) for r in out[absent].to_dict("records")]
    out["settings"] = _settings_labels(out)
    return out


def _settings_labels(table: pandas.DataFrame) -> list[str]:
    # Grouped without n_train (shown in its own column and compared by no label), so that one
    # series of a sweep over n_train carries the same label at every size.
    keys = [k for k in DISPLAY_KEYS if k in table.columns and k != "n_train"]
    first = table.drop_duplicates("settings_key")
    flats: dict[str, dict[str, str]] = {}
    ident: dict[str, tuple] = {}
    for r in first.to_dict("records"):
        flats[r["settings_key"]] = _flat(_config(r.get("config_json")) or {})
        ident[r["settings_key"]] = tuple("" if _missing(r.get(k)) else str(r.get(k)) for k in keys)
    groups: dict[tuple, list[str]] = {}
    for key, idt in ident.items():
        groups.setdefault(idt, []).append(key)
    labels: dict[str, str] = {}
    for members in groups.values():
        names = sorted({n for m in members for n in flats[m]} - {"variant", "n_train"})
        differing = [n for n in names if len({flats[m].get(n, "–") for m in members}) > 1]  # none for one key
        for m in members:
            # A setting that changes the training target is named even on a row of its own.
            named = [n for n, paper in ALWAYS_NAMED.items()
                     if n not in differing and flats[m].get(n, json.dumps(paper)) != json.dumps(paper)]
            parts = [f"{n}={flats[m].get(n, '–')}" for n in named + differing]
            labels[m] = ", ".join(parts)  # empty: only n_train differs
    return [labels[k] for k in table["settings_key"]]


#: Settings named in every row's ``settings`` label whenever they depart from the paper's value:
#: they change what the flow is trained towards, so a row without them would read as the paper's.
ALWAYS_NAMED = {"kl_energy_cut": "off"}


def capabilities_known(rows: pandas.DataFrame) -> bool:
    """Whether ``rows`` record their models' capabilities (tables collected before they were a
    column do not)."""
    return "capabilities" in rows.columns and bool((rows["capabilities"].astype(str) != "").any())


def has_capability(rows: pandas.DataFrame, capability: str) -> pandas.Series:
    """Boolean mask: the row's model has ``capability`` (``capabilities`` is ``;``-joined)."""
    caps = rows["capabilities"].astype(str).str.split(";")
    return caps.apply(lambda c: capability in c).astype(bool) if len(rows) else caps.astype(bool)


def is_equivariant_flow(rows: pandas.DataFrame) -> pandas.Series:
    """Boolean mask: a *learned* equivariant model (capabilities ``equivariant`` and ``trainable``),
    what the paper's claims are about. The closed-form Gaussian baseline is equivariant too but
    learns nothing beyond a width; judging it as "the equivariant flow" would decide a claim about
    flows by a baseline."""
    return has_capability(rows, "equivariant") & has_capability(rows, "trainable")


# -- numbers --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    """Significant digits, not decimals: the tables mix seconds (1e-3) and NLLs (1e3)."""
    if value is None or _missing(value):
        return "–"
    value = float(value)
    if math.isinf(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.{digits}g}"


def pm(mean: float, std: float, n: int) -> str:
    """``mean ± std`` (std over n > 1 repeats), or the mean alone where there is one repeat."""
    if n > 1 and not _missing(std):
        return f"{fmt(mean)} ± {fmt(std, 2)}"
    return fmt(mean)


def seed_stats(rows: pandas.DataFrame, metrics: str | Sequence[str]) -> pandas.DataFrame:
    """Mean, std, min and max **across seeds** per (settings key, metric).

    A seed's value is the mean of its rows (its rounds, where a metric repeats rounds), so the
    spread is the seed-to-seed spread. Columns: ``settings_key``, ``metric``, ``mean``, ``std``
    (NaN for one seed), ``n_seeds``, ``min``, ``max`` and the identifying columns of the key
    (``system``, ``model``, ``variant``, ``n_train``, ``profile``, ``settings``, ``capabilities``).
    ``rows`` must carry :func:`with_settings`'s columns.
    """
    import pandas as pd

    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    ident = ["system", "model", "variant", "n_train", "profile", "settings", "capabilities"]
    cols = ["settings_key", "metric", "mean", "std", "n_seeds", "min", "max"] + ident
    sel = rows[rows["metric"].isin(metrics)]
    if sel.empty:
        return pd.DataFrame(columns=cols)
    seeds = sel.assign(seed=sel["seed"].astype("Float64").fillna(-1.0), value=sel["value"].astype(float))
    per_seed = seeds.groupby(["settings_key", "metric", "seed"], sort=True)["value"].mean().reset_index()
    agg = per_seed.groupby(["settings_key", "metric"], sort=True)["value"].agg(
        mean="mean", std="std", n_seeds="count", min="min", max="max").reset_index()
    first = sel.drop_duplicates("settings_key").set_index("settings_key")
    for col in ident:
        agg[col] = agg["settings_key"].map(first[col]) if col in first.columns else ""
    return agg[cols]


def concat_rows(*frames: pandas.DataFrame) -> pandas.DataFrame:
    """The frames one under the other (empty ones skipped)."""
    import pandas as pd

    frames = tuple(f for f in frames if not f.empty)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def settings_name(stat: Any, *, n_train: bool = True) -> str:
    """``model (variant) n_train=10 lr=0.001 [ab12cd34]``: which settings a number belongs to,
    with the first 8 characters of its settings key."""
    name = str(stat["model"])
    if stat["variant"]:
        name += f" ({stat['variant']})"
    if n_train and not _missing(stat["n_train"]):
        name += f" n_train={int(stat['n_train'])}"
    if stat["settings"]:
        name += f" {stat['settings']}"
    return f"{name} [{str(stat['settings_key'])[:8]}]"


def short_name(stat: Any, *, system: bool = False) -> str:
    """``dw4 node (aug) lr=0.001``: a settings key's label for a figure (no key, no n_train)."""
    name = (f"{stat['system']} " if system else "") + str(stat["model"])
    if stat["variant"]:
        name += f" ({stat['variant']})"
    return name + (f" {stat['settings']}" if stat["settings"] else "")


def draw_curves(ax: Any, curves: pandas.DataFrame) -> None:
    """One line per settings key and seed of a stepped metric (a training curve) on ``ax``,
    labelled ``<model> seed <n>``; a curve of one or two logged points gets markers so it shows.
    Settings labels the caller derived from the whole table are kept (a subset could label them
    differently)."""
    curves = with_settings(curves) if "settings" not in curves.columns else curves
    for (_, seed), group in curves.groupby(["settings_key", "seed"], sort=True):
        group = group.sort_values("step")
        ax.plot(group["step"].astype(float), group["value"].astype(float), linewidth=1.0,
                marker="." if len(group) < 3 else None, label=f"{short_name(group.iloc[0])} seed {int(seed)}")


def describe(stat: Any, digits: int = 4) -> str:
    """``12.3 ± 0.41 (3 seeds, 11.9…12.7)`` or ``12.3 (1 seed)``: a mean with its seeds and
    spread across them."""
    n = int(stat["n_seeds"])
    if n > 1:
        return (f"{fmt(stat['mean'], digits)} ± {fmt(stat['std'], 2)} "
                f"({n} seeds, {fmt(stat['min'], 3)}…{fmt(stat['max'], 3)})")
    return f"{fmt(stat['mean'], digits)} (1 seed)"


def point(stat: Any, label: str | None = None, published: float | None = None) -> Point:
    """A :class:`Point` for a claim's figure from one row of :func:`seed_stats`."""
    return Point(label=label if label is not None else settings_name(stat, n_train=False),
                 mean=float(stat["mean"]), std=float(stat["std"]) if not _missing(stat["std"]) else math.nan,
                 n_seeds=int(stat["n_seeds"]), published=published)
