"""``density-estimation``: statistical efficiency, NLL vs training-set size (paper §7.3, Fig. 5, 8, 9).

Protocol (paper §7.3, C.1-C.5, SPEC §3-§5): for each training-set size ``n_train`` (paper: 10,
100, 1,000, 10,000) draw that many configurations from the training pool with a permutation
seeded by the cell's seed, fit the model by maximum likelihood (AdamW, lr 5e-3, weight decay
0.01, batch 64; the CNFs without a closed-form divergence, the SchNet flow and the nODE, train
with one Hutchinson probe), then
score ``-log q`` with the *exact* divergence on the training set and on the independent test set
(SPEC §1: nats per configuration on the CoM-free subspace, Gaussian constant included).
``test_source = "community"`` scores the test NLL and the sample metrics on the community (EFM/DEM)
test split of the same target instead (dw4, lj13; ``eqbench data --source community`` reports
its flaws), so that numbers sit beside that lineage's; training and validation stay on eqbench's
splits, and the test records' units name the split.

Non-equivariant models (no claimed rotation + permutation symmetry) run twice per size: as they
are (variant ``""``) and with data augmentation (variant ``"aug"``: each batch rotated/reflected
and permuted at random, the "aug neq nODE" of Fig. 5). Equivariant models run once: their
likelihood is invariant, so augmenting their batches would change nothing but the noise.

The paper trains "until convergence"; a benchmark needs a fixed budget, so ``iterations`` is a
profile setting, the same for every model and size, and the final training loss is recorded so
an unconverged run is visible. Scoring a flow without closed-form divergence exactly costs one
backward pass per coordinate per ODE step, so ``n_test`` and ``n_train_eval`` (the most training
configurations scored) are profile settings too; each record's unit says the trace was exact.

**Sample quality** (the field's evaluation standard since 2023; iDEM, Akhound-Sadegh et al. 2024):
after scoring, ``n_metric_samples`` configurations are drawn from the trained flow (without
``log q``, which nothing here weights: :func:`eqbench.tasks.common.sample_positions`; a CNF
integrates its velocity alone) and compared with the ``n_test``
test configurations by :func:`eqbench.tasks.common.sample_quality_records`: ``energy_w1_flow``,
``energy_w2_flow`` (kT, over the samples of finite energy), ``distance_w2_flow``,
``dist_tv_flow`` (200-bin interatomic-distance histogram TV), ``coord_w2_flow`` and
``coord_w2_aligned_flow`` (configuration W2, exact OT, plain and permutation-rotation aligned, on
at most ``coord_w2_samples`` / ``coord_w2_aligned_samples`` configurations per set). Nothing is
reweighted here. Samples with a non-finite coordinate are left out and counted
(``n_metric_samples_nonfinite``); ``sample_wall_s`` and ``sample_metrics_wall_s`` time the two steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import Record
from eqbench.tasks.base import CellContext, Task
from eqbench.tasks.common import (
    COMMUNITY_TEST_DETAIL,
    augmentation_cells,
    augmentation_reason,
    check_finite,
    check_kl_setting,
    check_sample_metric_settings,
    check_test_source,
    community_missing,
    community_missing_reason,
    guard_records,
    load_test_split,
    nll_records,
    positive_int,
    sample_quality_records,
    sample_positions,
    selection_records,
    split_detail,
    train_flow,
    training_loss_records,
)

from eqbench.tasks.reporting import (
    NLL_CONVENTION,
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    SAMPLE_METRIC_CONVENTION,
    Claim,
    ClaimResult,
    TaskSection,
    concat_rows,
    describe,
    fmt,
    has_capability,
    is_equivariant_flow,
    point,
    seed_stats,
    settings_name,
    short_name,
)

if TYPE_CHECKING:
    import pandas

__all__ = ["DensityEstimation", "TASK", "nll_axis_label", "nll_plot_rows"]

#: The unit of an exact NLL; an estimated one says so instead (``nll_records``: real NVP's
#: importance-weighted CoM marginal is "nats, IW estimate K=64", paper B.2).
NLL_UNIT = "nats, exact"


class DensityEstimation(Task):
    """NLL on train and test after maximum-likelihood training on 10 .. 10,000 samples."""

    name = "density-estimation"
    trains = True
    summary = "NLL on train and test vs training-set size, with/without augmentation (paper §7.3, Fig. 5, 8, 9)"
    #: ``harmonic``: the known-answer system (target = prior; NLL of the prior known in closed form).
    systems = ("dw2", "dw4", "lj13", "lj55", "harmonic")
    grid_axes = ("n_train", "augment")
    data_splits = {"n_train": "train", "n_test": "test", "n_val": "val"}

    def validate(self, params: Mapping[str, Any]) -> None:
        for key in ("n_train", "n_test", "n_train_eval", "n_val", "validate_every", "iterations", "batch_size",
                    "n_metric_samples"):
            positive_int(params, key)
        check_sample_metric_settings(params)
        check_kl_setting(params)
        from eqbench.train import SELECTIONS

        if params.get("model_selection") not in SELECTIONS:
            raise ConfigError(f"model_selection must be one of {', '.join(SELECTIONS)}, "
                              f"got {params.get('model_selection')!r}")
        if not isinstance(params.get("augment"), bool):
            raise ConfigError(f"augment must be true or false (or a list of them), got {params.get('augment')!r}")
        check_test_source(params)

    def expand_cell(self, params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
        if community_missing(params, system):
            return []
        return augmentation_cells(params, model, system)

    def no_cells_reason(self, params: Mapping[str, Any], model: str, system: str) -> str:
        if community_missing(params, system):
            return community_missing_reason(system)
        return augmentation_reason(params, model)

    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        """Training costs per configuration-step (iterations x batch), scoring per configuration
        scored (training and test) with the exact trace, sampling per flow sample, the aligned
        coordinate W2 per aligned pair. Cells from before the sample metrics did none of that work
        (0), so they still price the other phases."""
        checkpoints = 1 + math.ceil(params["iterations"] / params["validate_every"])
        return {"fit_wall_s": params["iterations"] * params["batch_size"],
                "validation_wall_s": params["n_val"] * checkpoints,
                "eval_wall_s": min(params["n_train"], params["n_train_eval"]) + params["n_val"] + params["n_test"],
                "sample_wall_s": params.get("n_metric_samples", 0),
                "sample_metrics_wall_s": params.get("coord_w2_aligned_samples", 0) ** 2}

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch

        from eqbench.components import build_model
        from eqbench.data.loading import load_data

        p = ctx.params
        flow = build_model(ctx.model, ctx.system, p.get("model_config", {})).to(ctx.device)
        dtype = next(flow.parameters()).dtype
        train = load_data(ctx.system, split="train", n=p["n_train"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        test = load_test_split(ctx, p["n_test"], dtype=dtype, device=ctx.device)
        val = load_data(ctx.system, split="val", n=p["n_val"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        torch.manual_seed(ctx.seed)
        start = time.perf_counter()
        result = train_flow(ctx, flow, train, iterations=p["iterations"], batch_size=p["batch_size"],
                            augment=bool(p["augment"]), validation=val)
        ctx.keep_model(flow)
        records = [ctx.record("n_parameters", flow.n_parameters, "count"),
                   ctx.record("fit_wall_s", time.perf_counter() - start + result.earlier_wall_s
                              - result.validation_wall_s, "s")]
        records += selection_records(ctx, result)
        records += guard_records(ctx, result)
        records += training_loss_records(ctx, result)
        start = time.perf_counter()
        records += nll_records(ctx, flow, train[:p["n_train_eval"]], "nll_train")
        records += nll_records(ctx, flow, val, "nll_val")
        records += nll_records(ctx, flow, test, "nll_test", detail=split_detail(p))
        records.append(ctx.record("eval_wall_s", time.perf_counter() - start, "s"))
        records += self.sample_records(ctx, flow, test)
        check_finite(records)
        return records

    def sample_records(self, ctx: CellContext, flow: Any, test: Any) -> list[Record]:
        """``n_metric_samples`` flow samples against the test configurations: the sample-quality
        records of :func:`eqbench.tasks.common.sample_quality_records` (no reweighting)."""
        import numpy as np
        import torch

        from eqbench import metrics

        p = ctx.params
        start = time.perf_counter()
        x = sample_positions(flow, p["n_metric_samples"], seed=ctx.seed, progress=ctx.progress)
        records = [ctx.record("sample_wall_s", time.perf_counter() - start, "s")]
        x64 = x.detach().to("cpu", torch.float64)
        test64 = test.detach().to("cpu", torch.float64)
        x_np = metrics.as_array(x64)
        ok = np.isfinite(x_np).all(axis=(1, 2))
        records += [ctx.record("n_metric_samples", len(x_np), "count (flow samples drawn for the sample metrics)"),
                    ctx.record("n_metric_samples_nonfinite", int((~ok).sum()),
                               "count (a non-finite coordinate: left out of the sample metrics)")]
        if not ok.any():
            raise FloatingPointError(f"every one of the {len(x_np)} flow samples has a non-finite coordinate")
        u = metrics.as_array(ctx.system.energy(x64[torch.from_numpy(ok)]))
        records += sample_quality_records(ctx, x_np[ok], u, metrics.as_array(test64),
                                          metrics.as_array(ctx.system.energy(test64)), detail=split_detail(p))
        return records

    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """NLL vs training-set size, train dashed and test solid, one line per model variant,
        one panel per system (paper Fig. 5, 8, 9; mean ± std over seeds as in C.7)."""
        import seaborn as sns

        from eqbench.plots import metric_rows, new_figure, save_figure

        rows = nll_plot_rows(metric_rows(table, ["nll_train", "nll_test"]))
        if rows.empty:
            return []
        systems = sorted(rows["system"].unique())
        variants = sorted(rows["model variant"].unique())
        palette = dict(zip(variants, sns.color_palette("colorblind", len(variants))))  # same colour in every panel
        fig, axes = new_figure(len(systems), width=4.8, height=3.8)
        for ax, system in zip(axes, systems):
            panel = rows[rows["system"] == system]
            sns.lineplot(data=panel, x="n_train", y="value", hue="model variant", palette=palette,
                         hue_order=variants,
                         style="data", style_order=["test", "train"], markers=True, errorbar="sd", ax=ax)
            ax.set_xscale("log")
            ax.set_xlabel("training-set size")
            ax.set_ylabel(nll_axis_label(panel))
            # An overfitted model's test NLL can be 100x the others' (real NVP without
            # augmentation, B.2); keep the informative range readable and say what is off scale.
            q1, q3 = panel["value"].quantile([0.25, 0.75])
            top = min(panel["value"].max(), q3 + 3.0 * (q3 - q1))
            off = panel[panel["value"] > top]
            margin = 0.05 * (top - panel["value"].min() + 1e-9)
            ax.set_ylim(panel["value"].min() - margin, top + margin)
            title = system
            if not off.empty:
                names = ", ".join(sorted(set(off["model variant"] + " " + off["data"])))
                title += f"\noff scale: {names} (up to {off['value'].max():.0f})"
            ax.set_title(title, fontsize="small")
            if ax is axes[-1]:
                ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
            else:
                ax.get_legend().remove()
        return save_figure(fig, out_dir, "nll_vs_training_size")

    def report_section(self) -> TaskSection:
        """Headline NLLs per settings key beside §7.4, the peer's NLLs and C.1-C.5's parameter
        counts; decides the claim that equivariant flows generalise from few samples."""
        return _report_section()


# -- report (what eqbench.report shows of this task) --------------------------------------------


def claim_generalisation(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """Equivariant flows generalise from few samples (§7.3, Fig. 5).

    Every learned equivariant model (capabilities ``equivariant`` and ``trainable``: not the
    closed-form Gaussian baseline) is compared with every model without ``equivariant`` (each of
    their variants: as they are and with augmentation ``aug``), settings key by settings key, per
    system at the smallest ``n_train`` where both kinds have a test NLL. Thresholds: reproduced
    when, at that size, each equivariant settings key's test NLL (mean over its seeds) is lower
    than every non-equivariant settings key's, *and* its train-test gap (test - train NLL) is at
    most 1 nat per configuration or smaller than the gap of every non-augmented non-equivariant
    settings key (these overfit a few samples: their gap is the failure the paper shows). Every
    system measured must pass.
    """
    rows = ok[(ok["task"] == "density-estimation") & ok["metric"].isin(["nll_test", "nll_train"])]
    stats = seed_stats(rows, ["nll_test", "nll_train"])
    test = stats[stats["metric"] == "nll_test"]
    eq, neq = test[is_equivariant_flow(test)], test[~has_capability(test, "equivariant")]
    if eq.empty or neq.empty:
        return ClaimResult(NOT_MEASURED, "needs density-estimation test NLLs of a model with capability "
                                         "'equivariant' and of a model without it.")
    train = stats[stats["metric"] == "nll_train"].set_index("settings_key")["mean"]
    parts, points, passed = [], [], True
    for system in sorted(eq["system"].unique()):
        e_sys, o_sys = eq[eq["system"] == system], neq[neq["system"] == system]
        common = sorted(set(e_sys["n_train"].dropna()) & set(o_sys["n_train"].dropna()))
        if not common:
            continue
        n = common[0]
        e_at, o_at = e_sys[e_sys["n_train"] == n], o_sys[o_sys["n_train"] == n]
        o_gaps = [o["mean"] - train.get(o["settings_key"], math.nan)
                  for _, o in o_at.iterrows() if o["variant"] != "aug"]
        judged = []
        for _, e in e_at.iterrows():
            gap = e["mean"] - train.get(e["settings_key"], math.nan)
            beaten = all(e["mean"] < o["mean"] for _, o in o_at.iterrows())
            gap_ok = gap <= 1.0 or (bool(o_gaps) and all(gap < g for g in o_gaps))
            passed = passed and beaten and gap_ok
            judged.append(f"{settings_name(e, n_train=False)} test NLL {describe(e)}, gap {fmt(gap, 2)}"
                          + ("" if beaten else " — not the lowest") + ("" if gap_ok else " — gap too large"))
        others = [f"{settings_name(o, n_train=False)} {describe(o)}" for _, o in o_at.iterrows()]
        parts.append(f"{system}, n_train={int(n)}: " + "; ".join(judged) + " vs " + "; ".join(others))
        points += [point(s, short_name(s, system=True)) for _, s in concat_rows(e_at, o_at).iterrows()]
    if not parts:
        return ClaimResult(NOT_MEASURED, "no training-set size where both an equivariant and a non-equivariant "
                                         "model were scored.")
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, "; ".join(parts) + ".", tuple(points),
                       "test NLL at the smallest n_train (nats)")


#: Training-set size of the peers' density-estimation protocol (E-NF data sets: 1,000 training
#: configurations; Satorras et al. 2021, Midgley et al. 2023), which their published NLLs follow.
PEER_N_TRAIN = 1000


def _pair_published(row: dict[str, Any]) -> tuple | None:
    """C.1-C.5 parameter counts are recorded under the same metric name by every training task; a
    peer's test NLL (a model eqbench builds, trained on :data:`PEER_N_TRAIN` configurations) sits
    beside eqbench's cells of that model at that size, its conventions in the published row."""
    if row["metric"] == "n_parameters":
        return (row["model"], "", "n_parameters")
    if row["metric"] == "nll_test" and row["source"] != "kohler2020":
        return (row["model"], "", "nll_test", {"n_train": PEER_N_TRAIN})
    return None


def _report_section() -> TaskSection:
    return TaskSection(
        task="density-estimation",
        title="Density estimation: NLL vs training-set size",
        paper="§7.3, Fig. 5, 8, 9",
        conventions=NLL_CONVENTION + " Variant 'aug': non-equivariant model trained with random rotations and "
                    "permutations of every batch. The scored model is the checkpoint named by model_selection "
                    "(selected_iteration; 'best-validation': lowest exact NLL on the validation split, disjoint "
                    "from train and test). nll_test_k1_gap: for an importance-weighted NLL (real NVP, unit 'IW "
                    "estimate K=…'), the one-draw NLL minus the K-draw one. Sample quality: n_metric_samples "
                    "flow samples of the scored model against the test split, not reweighted. final_train_loss / "
                    "train_loss: the training objective; for a model trained with a penalty (se3-acf's "
                    "frame_penalty) it includes it, and final_train_penalty / train_penalty give its share. "
                    + SAMPLE_METRIC_CONVENTION,
        metrics=("nll_train", "nll_val", "nll_test", "nll_test_k1_gap", "kl_test", "kl_test_stderr",
                 "selected_iteration", "final_train_loss", "final_train_penalty",
                 "n_parameters", "energy_w1_flow", "energy_w2_flow", "dist_tv_flow", "coord_w2_flow",
                 "coord_w2_aligned_flow"),
        baseline=lambda r: r["table"] == "§7.4" or r["metric"] == "nll_test" or r["metric"] == "n_parameters",
        pair=_pair_published,
        claims=(Claim("generalisation", "Equivariant flows generalise from few samples", "§7.3, Fig. 5",
                      claim_generalisation, needs=("equivariant",)),),
        order=1,
    )


TASK = DensityEstimation()


def nll_plot_rows(rows: pandas.DataFrame) -> pandas.DataFrame:
    """The NLL rows of the density-estimation plot with its ``model variant`` (hue) and ``data``
    (train / test) columns.

    Rows scored on the community test split are other numbers than those on eqbench's split, so
    they get their own line (``[community test]`` in the variant) and the split's description
    leaves their unit, which then names only the estimator (:func:`nll_axis_label`).

    Example:
        >>> import pandas
        >>> rows = pandas.DataFrame({"model": ["a", "a"], "variant": ["", ""], "metric": ["nll_test"] * 2,
        ...                          "n_train": [10, 10], "value": [1.0, 2.0],
        ...                          "unit": [NLL_UNIT, NLL_UNIT + ", " + COMMUNITY_TEST_DETAIL]})
        >>> list(nll_plot_rows(rows)["model variant"]), set(nll_plot_rows(rows)["unit"]) == {NLL_UNIT}
        (['a', 'a [community test]'], True)
    """
    rows = rows.copy()
    if rows.empty:
        return rows
    variant = rows["variant"].fillna("").astype(str)
    rows["model variant"] = rows["model"].where(variant == "", rows["model"] + " (" + variant + ")")
    rows["data"] = rows["metric"].map({"nll_train": "train", "nll_test": "test"})
    rows["n_train"] = rows["n_train"].astype(float)
    units = (rows["unit"] if "unit" in rows else rows["metric"].map(lambda _: "")).fillna("").astype(str)
    community = units.str.contains(COMMUNITY_TEST_DETAIL, regex=False)
    rows["model variant"] = rows["model variant"].where(~community, rows["model variant"] + " [community test]")
    rows["unit"] = units.str.replace(", " + COMMUNITY_TEST_DETAIL, "", regex=False)
    return rows


def nll_axis_label(panel: pandas.DataFrame) -> str:
    """The y-label of one panel: ``NLL (nats, exact)``, or the estimator of every model whose NLL
    is an estimate (an importance-weighted bound names its K).

    Example:
        >>> import pandas
        >>> nll_axis_label(pandas.DataFrame({"model": ["a", "b"], "unit": [NLL_UNIT, "nats, IW estimate K=20"]}))
        'NLL (nats; b: IW estimate K=20)'
    """
    estimated = sorted({f"{m}: {u.removeprefix('nats, ')}" for m, u in zip(panel["model"], panel["unit"])
                        if u not in ("", NLL_UNIT)})
    return "NLL (nats, exact)" if not estimated else f"NLL (nats; {'; '.join(estimated)})"
