"""``energy-training``: flows trained from the target energy alone, no data (Midgley et al. 2023).

Midgley et al. ("SE(3) Equivariant Augmented Coupling Flows", NeurIPS 2023; seed 003) train
flows on DW-4 and LJ-13 "using only their energy functions" and report the reverse and the
forward effective sample size. This task asks the same of every trainable eqbench flow.

**Objective** (``method = "reverse-kl"``, the only one built). The reverse KL divergence

    KL(q‖p) = E_{x~q}[u(x) + log q(x)] + log Z,

minimised through :func:`eqbench.train.fit` at λ = 1 throughout (``lambda_start = lambda_end =
1``: the maximum-likelihood term is off and **no training data are read**; the only reference
data a cell reads are the ``n_test`` configurations of the test split, after training). Each
iteration draws ``kl_batch_size`` samples with the model's *training* estimator
(:meth:`~eqbench.flows.base.Flow.training_sample`) and steps on the mean of ``u + log q`` (the
reparameterisation gradient; Köhler et al. 2020 §2 and paper B.3 train with the same term).

*Augmented flows.* A flow of an extended space ``(x, a)`` — real NVP with its Gaussian CoM
(paper B.2), or an augmented coupling flow with auxiliary particles (Midgley et al. 2023, §3) —
returns from ``training_sample`` the exact extended-space log-density
``log q(x, a) - log π(a|x)``; the loss is then ``E_q[u(x) - log π(a|x) + log q(x, a)]``, the
reverse KL from ``q(x, a)`` to the extended target ``p(x) π(a|x)``, whose x-marginal is p
(Midgley et al. 2023 likewise define their training objectives on the extended space). It
bounds the marginal reverse KL from above (chain rule of the KL), so minimising it is sound; no
marginal density is estimated.

*Not built:* flow annealed importance sampling bootstrap with a replay buffer (FAB, Midgley,
Stimper et al., ICLR 2023), the α = 2 objective Midgley et al. 2023 use for their energy-trained
flows: AIS with HMC moves from q towards p²/q, the α = 2 importance-weighted loss and a
prioritised replay buffer were not built and tested here. For an augmented flow its AIS moves
also need ``log q(x, a)`` and its gradient at arbitrary points of the extended space, which the
:class:`~eqbench.flows.base.Flow` interface gives only for the flow's own samples.
``method = "fab"`` is refused with that reason. Reverse KL is mode-seeking (a flow may
cover only some of DW-4's or LJ-13's metastable arrangements), which the forward ESS below
exposes.

**After training** ``n_samples`` configurations are drawn with their exact ``log q`` (on the
extended space for augmented flows; see :mod:`eqbench.flows.real_nvp`) and scored against
``n_test`` configurations of the independent MCMC test split (SPEC §3):

- *reverse ESS* (``ess_fraction``): Kish's ``(Σw)²/Σw²`` of ``log w = -u - log q`` of the flow
  samples, as a fraction of *all* samples drawn (zero and undefined weights count;
  :func:`eqbench.metrics.importance_weights`, the bg-reweighting convention);
- *forward ESS* (``forward_ess_fraction``, :func:`eqbench.metrics.forward_ess_fraction`):
  ``n² / (Σw · Σ1/w)`` of the weights at the *test* configurations ``x ~ p`` (Midgley et al.'s
  ``calculate_forward_ess``); it falls when the flow misses a mode, which the reverse ESS of the
  flow's own samples cannot see. ``log q`` of the test configurations is exact, or — for a flow
  whose ``log_prob`` is an importance-weighted estimate (``flow.iw_draws`` set) — the
  extended-space one-draw density ``log q(x, a) - log π(a|x)`` with ``a ~ π(a|x)``
  (``flow.log_prob(x, iw_draws=1, generator=...)``), the weight Midgley et al.'s code uses;
  the record's unit says which (:func:`eqbench.tasks.common.forward_ess_records`, shared with
  bg-reweighting). ``forward_log_w_std``, the spread of those log-weights, says how
  far a forward ESS of ~0 is from useful (for lognormal weights the fraction is ``exp(-σ²)``);
- mean energy of the flow samples, reweighted (self-normalised importance sampling) and of the
  MCMC test set, each with its bootstrap standard deviation (``n_bootstrap`` resamples), energy
  histograms on bins fixed by the MCMC energies, energy W2 and pooled interatomic-distance W2
  before and after reweighting — all from
  :meth:`eqbench.tasks.bg_reweighting.BGReweighting.reweighting_records`, so they mean exactly
  what bg-reweighting's numbers of the same names mean — with the energy W1 before and after
  reweighting and the sample-quality metrics of the field (``dist_tv_{flow,reweighted}``,
  ``coord_w2_flow``, ``coord_w2_aligned_flow``; :func:`eqbench.tasks.common.sample_quality_records`).
  Every W1/W2 is the distance itself, ``(∫|F⁻¹ - G⁻¹|^p dt)^(1/p)``, **not** its p-th power; the
  units say so;
- ``kl_estimate``: the mean of ``u + log q`` over the flow samples of finite energy,
  ``KL(q‖p) - log Z`` (an upper bound on ``-log Z``), beside ``final_kl_loss`` (the last logged
  training batch) and the stepped training curve ``kl_loss`` (every ``log_every`` = 10
  iterations); with ``kl_divergence`` (quick, paper) also ``reverse_kl`` = ``kl_estimate + log Z``,
  the reverse KL(q‖p) in nats, and ``kl_test`` = NLL_test − H(p), the forward one
  (:func:`eqbench.tasks.common.kl_records`; log Z from :mod:`eqbench.data.log_z`);
- ``nll_test`` (exact, or the IW estimate with its K = 1 gap for IW flows; Midgley et al.
  report test NLLs beside the ESS), ``iterations_done``, ``train_wall_s``, ``sample_wall_s``,
  ``score_wall_s``.

A training run whose loss or gradient turns non-finite is a failed cell with the loop's reason
(:func:`eqbench.tasks.common.train_flow`); so is a cell with a non-finite record or no flow
sample of positive weight.

**LJ-13 is not Midgley et al.'s target:** eqbench's ``lj13`` is Köhler et al.'s energy, which
counts every pair twice (ordered pairs, paper §6): its pair energy is twice the single-count
one Midgley et al. use (``eacf/targets/target_energy/leonard_jones.py``; the CoM oscillator is
the same), so ESS numbers on it are of a sharper target and not comparable number for number
(``baselines/README.md``). Their target is ``lj13-single`` (each pair counted once, as in
bgflow's ``LennardJonesPotential``; its own reference data): run this task on it to place
results beside theirs. Model defaults are the same for both (same kind and ``rm``); log Z for
``kl_divergence`` uses :mod:`eqbench.data.log_z`'s default AIS settings there, which have no
measured production setting for ``lj13-single``.

**Known answer** (``harmonic``): the target is the prior, so a flow that is its prior has
reverse and forward ESS exactly 1 and ``kl_estimate = -log Z`` (``log Z = ½ (N-1) D log 2π``
for ``u = ½|x|²`` on U); the tests run it end to end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import Record
from eqbench.tasks.base import CellContext, Task
from eqbench.tasks.bg_reweighting import TASK as BG_REWEIGHTING
from eqbench.tasks.common import (KL_SETTING, check_finite, check_kl_setting, check_sample_metric_settings,
                                  forward_ess_records, guard_records, nll_records, positive_int, sample_with_log_q,
                                  score_log_q, train_flow)
from eqbench.tasks.reporting import SAMPLE_METRIC_CONVENTION, HtmlTable, TaskSection, fmt, pm, seed_stats

if TYPE_CHECKING:
    import numpy as np
    import pandas
    import torch

    from eqbench.flows.base import Flow

__all__ = ["EnergyTraining", "TASK", "METHODS", "W_UNITS"]

#: Training objectives a cell may name; ``"fab"`` (Midgley et al. 2023's) is not built.
METHODS = ("reverse-kl",)

#: What every Wasserstein record is (F, G the two quantile functions): the distance itself; the
#: W2 is not squared.
W_UNITS = {1: "W1 = ∫|F⁻¹ - G⁻¹| dt", 2: "W2 = (∫|F⁻¹ - G⁻¹|² dt)^½, the distance, not squared"}


class EnergyTraining(Task):
    """Reverse-KL training from the energy alone; reverse and forward ESS, reweighting, W1/W2
    (see the module docstring)."""

    name = "energy-training"
    trains = True
    summary = ("training from the energy alone (reverse KL, no data); reverse and forward ESS, "
               "reweighted vs MCMC mean energy, energy W1/W2 (Midgley et al. 2023)")
    #: ``harmonic``: the known-answer system (target = prior), for end-to-end checks;
    #: ``lj13-single``: Midgley et al.'s own LJ-13 target (single-count pairs).
    systems = ("dw4", "lj13", "lj13-single", "harmonic")
    requires = ("trainable",)
    data_splits = {"n_test": "test"}

    # ------------------------------------------------------------------ settings
    def validate(self, params: Mapping[str, Any]) -> None:
        method = params.get("method")
        if method == "fab":
            raise ConfigError("method 'fab' (flow annealed importance sampling bootstrap with a replay buffer, "
                              "Midgley et al. 2023) is not built in eqbench; valid: " + ", ".join(METHODS))
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        for key in ("iterations", "n_samples", "sample_batch_size", "n_test", "n_bootstrap", "energy_bins"):
            positive_int(params, key)
        check_sample_metric_settings(params)
        check_kl_setting(params)
        steps = params.get("solver_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"solver_steps must be 0 (the model's default) or a positive integer, got {steps!r}")
        if not isinstance(params.get("model_config", {}), Mapping):
            raise ConfigError(f"model_config must be a table of model settings, got {params.get('model_config')!r}")

    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        """Training per flow sample drawn with its training ``log q`` (``kl_batch_size`` per
        iteration); sampling per sample with exact ``log q``; scoring per test configuration."""
        return {"train_wall_s": params["kl_batch_size"] * params["iterations"],
                "sample_wall_s": params["n_samples"], "score_wall_s": params["n_test"],
                "sample_metrics_wall_s": params.get("coord_w2_aligned_samples", 0) ** 2}

    # ------------------------------------------------------------------ one cell
    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch

        from eqbench import metrics
        from eqbench.components import build_model
        from eqbench.data.loading import load_data
        from eqbench.flows.cnf import CNF

        p = ctx.params
        flow = build_model(ctx.model, ctx.system, p.get("model_config", {})).to(ctx.device)
        if isinstance(flow, CNF) and p["solver_steps"]:
            flow.with_solver(steps=p["solver_steps"])
        torch.manual_seed(ctx.seed)
        records = [ctx.record("n_parameters", flow.n_parameters, "count")]

        # -- training: reverse KL only (λ = 1 throughout: fit reads no data)
        start = time.perf_counter()
        result = train_flow(ctx, flow, None, iterations=p["iterations"], batch_size=p["kl_batch_size"],
                            lambda_start=1.0, lambda_end=1.0)
        records.append(ctx.record("train_wall_s", time.perf_counter() - start + result.earlier_wall_s, "s"))
        records.append(ctx.record("iterations_done", result.iterations_done, "iterations"))
        records += guard_records(ctx, result)
        ctx.keep_model(flow)
        kl_unit = f"kT, training estimator: mean of u + log q over one batch of {p['kl_batch_size']} (KL - log Z)"
        if result.history:
            records.append(ctx.record("final_kl_loss", result.history[-1]["kl"], kl_unit + ", last logged"))
            records += [ctx.record("kl_loss", entry["kl"], kl_unit, step=int(entry["iteration"]))
                        for entry in result.history]

        # -- samples with exact log q, scored against the MCMC test split
        start = time.perf_counter()
        x, log_q = sample_with_log_q(flow, p["n_samples"], batch_size=p["sample_batch_size"], seed=ctx.seed,
                                     progress=ctx.progress)
        records.append(ctx.record("sample_wall_s", time.perf_counter() - start, "s"))
        ctx.keep_samples(x, log_q)
        test = load_data(ctx.system, split="test", n=p["n_test"], seed=ctx.seed, dtype=torch.float64)
        log_q_np = metrics.as_array(log_q)
        records += self.sample_records(ctx, x, log_q_np, test)

        start = time.perf_counter()
        records += self.forward_records(ctx, flow, test)
        records.append(ctx.record("score_wall_s", time.perf_counter() - start, "s"))
        check_finite(records)
        return records

    def sample_records(self, ctx: CellContext, x: torch.Tensor, log_q: np.ndarray,
                       test: torch.Tensor) -> list[Record]:
        """Everything computed from the flow samples: bg-reweighting's records (counts, reverse
        ESS, mean energies, histograms, energy W1/W2, distance W2, distance TV, coordinate W2s),
        with units naming the sample sets, plus the KL estimate. Separate from :meth:`run_cell` to be testable on hand-made samples."""
        import numpy as np
        import torch

        from eqbench import metrics

        n, n_test = len(x), len(test)
        flow_set = f"{n} flow samples"
        test_set = f"{n_test} MCMC test-split configurations"
        extra = {
            "ess_fraction": f"reverse ESS of the {flow_set}",
            "mean_energy_flow": flow_set,
            "mean_energy_flow_std": flow_set,
            "mean_energy_reweighted": f"{flow_set}, self-normalised importance sampling",
            "mean_energy_reweighted_std": f"{flow_set}, self-normalised importance sampling",
            "mean_energy_mcmc": test_set,
            "mean_energy_mcmc_std": test_set,
            "energy_w1_flow": f"{W_UNITS[1]}, {flow_set} vs {test_set}",
            "energy_w1_reweighted": f"{W_UNITS[1]}, reweighted {flow_set} vs {test_set}",
            "energy_w2_flow": f"{W_UNITS[2]}, {flow_set} vs {test_set}",
            "energy_w2_reweighted": f"{W_UNITS[2]}, reweighted {flow_set} vs {test_set}",
            "distance_w2_flow": f"{W_UNITS[2]}, pooled pair distances, {flow_set} vs {test_set}",
            "distance_w2_reweighted": f"{W_UNITS[2]}, pooled pair distances, reweighted {flow_set} vs "
                                      f"{test_set}",
            "dist_tv_flow": f"{flow_set} vs {test_set}",
            "dist_tv_reweighted": f"reweighted {flow_set} vs {test_set}",
            "coord_w2_flow": f"subsampled from {flow_set} and {test_set}",
            "coord_w2_aligned_flow": f"subsampled from {flow_set} and {test_set}",
        }
        shared = BG_REWEIGHTING.reweighting_records(ctx, x, log_q, test)
        records = [dataclasses.replace(r, unit=f"{r.unit}; {extra[r.metric]}") if r.metric in extra and r.step is None
                   else r for r in shared]

        x64 = x.detach().to("cpu", torch.float64)
        x_np = metrics.as_array(x64)
        u = np.where(np.isfinite(x_np).all(axis=(1, 2)), metrics.as_array(ctx.system.energy(x64)), np.nan)
        iw = metrics.importance_weights(u, log_q)
        log_w = iw.log_w[np.isfinite(iw.log_w)]
        if log_w.size:
            records.append(ctx.record("kl_estimate", float(-log_w.mean()),
                                      f"kT, mean of u + log q over the {log_w.size} of {n} flow samples of finite "
                                      "energy and log q (KL(q‖p) - log Z)"))
            if ctx.params.get(KL_SETTING) is True:
                from eqbench.data.log_z import load_log_z, log_z_method

                log_z = load_log_z(ctx.system)
                records.append(ctx.record(
                    "reverse_kl", float(-log_w.mean()) + log_z["log_z"],
                    f"nats, KL(q‖p) = kl_estimate + log Z over the same {log_w.size} samples; log Z = "
                    f"{log_z['log_z']:.4f} ± {log_z['log_z_stderr']:.4f} by {log_z_method(log_z)} "
                    "(a lower bound, so this KL is too)"))
        return records

    def forward_records(self, ctx: CellContext, flow: Flow, test: torch.Tensor) -> list[Record]:
        """Forward ESS (Midgley et al. 2023) and the test NLL from one scoring pass over the test
        split (:func:`eqbench.tasks.common.score_log_q`: exact log q, or for a flow whose
        ``log_prob`` is an importance-weighted estimate the one-draw extended-space density for
        the weights and the K-draw estimate for the NLL)."""
        ref = next(flow.parameters())
        n_test = len(test)
        test_on_device = test.to(device=ref.device, dtype=ref.dtype)
        scored = score_log_q(ctx, flow, test_on_device, batch_size=ctx.params["sample_batch_size"])
        records = forward_ess_records(ctx, flow, scored, ctx.system.energy(test))
        return records + nll_records(ctx, flow, test_on_device, "nll_test",
                                     detail=f"test split, {n_test} configurations", scored=scored)

    # ------------------------------------------------------------------ figures
    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """Energy histograms of flow, reweighted and MCMC samples per system (bg-reweighting's
        figure, one panel per settings key) and the training KL curves per system."""
        written = BG_REWEIGHTING.plot(table, out_dir)
        for system, rows in table.groupby("system", sort=True):
            curves = rows[(rows["metric"] == "kl_loss") & rows["step"].notna()]
            if not curves.empty:
                written += _plot_kl(str(system), curves, out_dir)
        return written

    def report_section(self) -> TaskSection:
        """One table per system: reverse and forward ESS, reweighted vs MCMC mean energy and the
        energy W2 per settings key (mean ± std across seeds); Midgley et al.'s reverse ESS beside."""
        return TaskSection(
            task=self.name,
            title="Training from the energy alone (reverse KL)",
            paper="Midgley et al. 2023 (energy-trained DW-4, LJ-13); no claim of Köhler et al. 2020",
            conventions=(
                "Trained by reverse KL only (no data). Reverse ESS: Kish's (Σw)²/Σw² of the flow samples as a "
                "fraction of all drawn; forward ESS: n²/(Σw·Σ1/w) at the MCMC test configurations (Midgley et "
                "al. 2023), with the extended-space one-draw log q for importance-weighted flows; w = exp(−u − "
                "log q). Energies in kT; ⟨u⟩ reweighted by self-normalised importance sampling; '|Δ|/σ' is "
                "|⟨u⟩_rew − ⟨u⟩_MCMC| over the combined bootstrap std (mean over seeds of each cell's), a "
                "check, not a claim. W2 is the distance, not squared. LJ-13 here is Köhler et al.'s ordered-pair "
                "energy, twice the single-count energy Midgley et al. train on (a colder target). Their reverse "
                "ESS (seed 003 summary: unit and training setup not stated there) sits beside, not comparable. "
                + SAMPLE_METRIC_CONVENTION),
            baseline=lambda r: r["source"] == "midgley2023" and r["metric"] == "reverse_ess",
            extra_tables=_system_tables,
            order=2.5,
        )


_TABLE_METRICS = ("ess_fraction", "forward_ess_fraction", "mean_energy_flow", "mean_energy_reweighted",
                  "mean_energy_reweighted_std", "mean_energy_mcmc", "mean_energy_mcmc_std", "energy_w2_flow",
                  "energy_w2_reweighted", "distance_w2_reweighted", "energy_w1_flow", "energy_w1_reweighted",
                  "dist_tv_flow", "dist_tv_reweighted", "coord_w2_flow", "coord_w2_aligned_flow", "kl_estimate",
                  "reverse_kl", "nll_test", "kl_test", "kl_test_stderr", "iterations_done", "train_wall_s")


def _system_tables(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> list[HtmlTable]:
    """One table per system, one row per settings key: the headline numbers, mean ± std across
    seeds, and ``|Δ|/σ`` of the reweighted against the MCMC mean energy."""
    rows = ok[(ok["task"] == "energy-training") & ok["step"].isna()]
    stats = seed_stats(rows, _TABLE_METRICS)
    tables = []
    header = ["model", "variant", "settings", "seeds", "reverse ESS", "forward ESS", "⟨u⟩ flow",
              "⟨u⟩ reweighted", "⟨u⟩ MCMC", "|Δ|/σ", "energy W2 flow", "energy W2 reweighted",
              "distance W2 reweighted", "energy W1 flow", "energy W1 reweighted", "dist TV flow",
              "dist TV reweighted", "coord W2 flow", "coord W2 aligned flow", "KL − log Z", "iterations", "train s"]
    for system, group in stats.groupby("system", sort=True):
        out = []
        for key, cell in group.groupby("settings_key", sort=False):
            by = {r["metric"]: r for _, r in cell.iterrows()}
            first = cell.iloc[0]

            def show(metric: str) -> str:
                r = by.get(metric)
                return "–" if r is None else pm(float(r["mean"]), float(r["std"]), int(r["n_seeds"]))

            def mean(metric: str) -> float:
                r = by.get(metric)
                return math.nan if r is None else float(r["mean"])

            sigma = math.hypot(mean("mean_energy_reweighted_std"), mean("mean_energy_mcmc_std"))
            diff = abs(mean("mean_energy_reweighted") - mean("mean_energy_mcmc"))
            ratio = fmt(diff / sigma, 2) if sigma > 0 else "–"
            out.append([str(first["model"]), str(first["variant"]), str(first["settings"]),
                        str(int(max(int(r["n_seeds"]) for r in by.values()))),
                        show("ess_fraction"), show("forward_ess_fraction"), show("mean_energy_flow"),
                        show("mean_energy_reweighted"), show("mean_energy_mcmc"), ratio, show("energy_w2_flow"),
                        show("energy_w2_reweighted"), show("distance_w2_reweighted"), show("energy_w1_flow"),
                        show("energy_w1_reweighted"), show("dist_tv_flow"), show("dist_tv_reweighted"),
                        show("coord_w2_flow"), show("coord_w2_aligned_flow"), show("kl_estimate"),
                        show("iterations_done"), show("train_wall_s")])
        out.sort(key=lambda r: (r[0], r[1], r[2]))
        tables.append(HtmlTable(caption=f"{system}: trained from the energy alone, one row per settings key, "
                                        "mean ± std across seeds", header=header, rows=out))
    return tables


def _plot_kl(system: str, curves: pandas.DataFrame, out_dir: Path) -> list[Path]:
    """Training KL estimate (mean of u + log q per logged batch) against iteration, one line per
    settings key and seed."""
    from eqbench.plots import new_figure, save_figure
    from eqbench.tasks.reporting import draw_curves

    fig, axes = new_figure(1, width=5.0, height=3.6)
    ax = axes[0]
    draw_curves(ax, curves)
    ax.set_xlabel("iteration")
    ax.set_ylabel("⟨u + log q⟩ per batch (kT)")
    ax.set_title(f"{system}: reverse-KL training", fontsize="small")
    ax.legend(fontsize="x-small")
    return save_figure(fig, out_dir, f"kl_training_{system}")


TASK = EnergyTraining()
