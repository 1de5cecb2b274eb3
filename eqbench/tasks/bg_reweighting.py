"""``bg-reweighting``: flows as Boltzmann generators, reweighted to the target (paper §7.4, B.3, Fig. 3b, 6, 10).

Protocol (paper B.3, after Noé et al. 2019): pre-train by maximum likelihood on ``n_train``
(paper: 1,000) configurations of the training pool for ``pretrain_iterations``, then train on the
mix ``(1 - λ) L_ML + λ L_KL`` with λ rising linearly from 0 to ``lambda_end`` (paper: 0.5) over
``mix_iterations`` (:func:`eqbench.train.fit`: AdamW, lr 5e-3, weight decay 0.01, batch 64; C.1).
Then draw ``n_samples`` (paper: 10,000) configurations with their exact ``log q`` and compare them
with the independent MCMC test set (``n_test`` configurations, SPEC §3):

- log importance weights ``log w = -u - log q`` and Kish's ESS as a fraction (SPEC §1);
- the mean energy of the flow samples, of the reweighted samples (self-normalised importance
  sampling) and of the MCMC samples, each with the standard deviation over ``n_bootstrap``
  bootstrap resamples (paper C.7) — "reweighting works" means the reweighted mean agrees with the
  MCMC mean within these errors (Fig. 6, 10);
- energy histograms of the flow samples, the reweighted samples and the MCMC samples (Fig. 6, 10),
  on bins fixed by the MCMC energies so models of one system share them;
- the Wasserstein-2 distances that later work reports (seed 003): between the energy
  distributions and between the pooled interatomic-distance distributions of the flow samples and
  the test set, before and after reweighting;
- the sample-quality metrics the field reports since 2023 (iDEM, Akhound-Sadegh et al. 2024;
  :func:`eqbench.tasks.common.sample_quality_records`, :mod:`eqbench.sample_metrics`): energy W1
  beside the W2, the total variation between the 200-bin interatomic-distance histograms of the
  flow samples and the test set (before and after reweighting), and the 2-Wasserstein distance
  between the configuration distributions, exact OT, plain and with every pair aligned over
  permutations and rotations/reflections, on at most ``coord_w2_samples`` /
  ``coord_w2_aligned_samples`` configurations per set (an aligned pair costs 0.25-0.45 ms on LJ-13,
  so that count is the expensive one);
- ``-log q`` of the training and the test configurations after training (paper §7.4 quotes the
  collapsed nODE's train / test values, 10.85 / 11.40 on DW-4).

**Every sample counts** (:func:`eqbench.metrics.importance_weights`). A sample with infinite
energy (``u = +inf``: an LJ clash) and a finite ``log q`` has importance weight exactly zero: it
stays in the ESS denominator, in the reweighted statistics (contributing nothing) and in the flow
histogram (as mass beyond the bins); dropping it would flatter a flow that produces clashes. Only
samples whose weight is undefined — ``log q`` NaN or ±inf, energy NaN or ``-inf``, a non-finite
coordinate — are left out of the statistics. The records count all three: ``n_samples`` (drawn
and scored), ``n_samples_zero_weight``, ``n_samples_undefined``. The ESS fraction is Kish's ESS of
the defined weights divided by ``n_samples``, *all* samples drawn: neither zero nor undefined
weights raise it. The unweighted flow statistics that an infinite energy would make infinite
(``mean_energy_flow`` and its std, ``energy_w2_flow``) are over the samples of finite energy, and
say so in their unit. A cell whose samples all have zero or undefined weight fails.

**DW-2 free-energy profile (paper §7.1, Fig. 3b).** On ``dw2`` the cell also estimates the free
energy ``F(d) = -log p(d)`` along the particle distance ``d = |x_1 - x_2|`` from the flow samples:
unweighted, reweighted with the exact ``log q``, and — for continuous flows — reweighted with a
``log q`` of the *same* samples integrated with the one-probe Hutchinson divergence instead of the
exact one (the same prior draws ``z`` pushed through the same solver, so the configurations are
identical for the fixed-step DTO solver; only the accumulated log-determinant differs). The
reference is exact: on the CoM-free subspace ``x_1 = -x_2 = r/2``, a linear map with constant
Jacobian, so ``r = x_1 - x_2`` has density ``∝ exp(-f(|r|))`` and in 2-D polar coordinates
``p(d) ∝ d^(D-1) exp(-f(d)) = d exp(-f(d))`` (the factor ``d`` is the circumference of the circle of
radius d), integrated per bin by quadrature (:func:`eqbench.metrics.radial_free_energy`). Every
profile is normalised over the same distance range, so all share one reference without a fitted
offset; the records are shifted by the exact profile's minimum (F_exact = 0 at its lowest bin).
Bootstrap bands: the standard deviation over ``n_bootstrap`` reweighted bootstrap resamples (C.7:
100). The RMSE against the exact profile is taken over the bins where the exact profile lies within
``free_energy_window`` kT of its minimum.

**Variants.** Non-equivariant models run with and without data augmentation (variant ``"aug"``:
random rotation/reflection and permutation of every ML batch, paper §7.4's "aug neq nODE");
equivariant models only without (their likelihood is invariant, augmentation changes nothing).

**Records** (long format; stepped ones carry the bin index in ``step``): ``ess_fraction``
(reverse ESS, of the flow samples), ``forward_ess_fraction`` (on the ``n_test`` MCMC test
configurations, Midgley et al. 2023; :func:`eqbench.metrics.forward_ess_fraction`; an augmented
flow's weights use its one-draw extended-space density) and ``forward_ess_fraction_undefined``,
``n_samples``, ``n_samples_zero_weight``, ``n_samples_undefined``,
``mean_energy_{flow,reweighted,mcmc}`` and their ``_std``,
``energy_w1_{flow,reweighted}``, ``energy_w2_{flow,reweighted}``, ``distance_w2_{flow,reweighted}``,
``dist_tv_{flow,reweighted}``, ``coord_w2_flow``, ``coord_w2_aligned_flow``,
``sample_metrics_wall_s``, ``nll_train``, ``nll_test``,
``energy_fraction_above_range``, wall times; stepped ``energy_edge`` and
``energy_hist_{flow,reweighted,mcmc}``. DW-2 adds stepped ``distance_edge``,
``free_energy_exact`` and ``free_energy_{flow,reweighted,hutchinson}`` (with ``_std``; bins
without samples are omitted), ``free_energy_rmse_*`` and ``free_energy_coverage_*``, and for
continuous flows ``ess_fraction_hutchinson``, ``mean_energy_hutchinson(_std)``,
``n_samples_undefined_hutchinson`` and ``log_q_hutchinson_error_std`` (std of Hutchinson minus
exact ``log q`` over the samples where both are finite).

**Test split** (``test_source``, :func:`eqbench.tasks.common.load_test_split`): ``"eqbench"``
(every profile) scores on eqbench's own MCMC test split; ``"community"`` on the community (EFM/DEM)
test split of the same target (dw4, lj13; CoM removed on load, its flaws reported by ``eqbench
data --source community``), so that the numbers sit beside that lineage's. Training stays on
eqbench's training split. What changes with the split: ``nll_test`` (and ``kl_test``), the forward
ESS, the reference energies (``mean_energy_mcmc``, ``energy_hist_mcmc``, the energy bins) and every
sample metric against the test set (energy W1/W2, distance W2 and TV, coordinate W2s, flow and
reweighted); their units end with the split's description. The reverse ESS and the flow /
reweighted mean energies are of the flow samples alone and do not change, but the units of the
mean energies and of the flow / reweighted histograms name the reference they are compared with.
Other systems have no community split and make no cell (the request is refused with the reason).

**Known answer** (``harmonic``, :mod:`eqbench.systems.harmonic`): the target is the prior, so a
flow equal to its prior has ESS 1 and reweighted ``⟨u⟩ = (N-1) D / 2``; tests run it end to end.

Cost: sampling with the exact ``log q`` costs one backward pass per coordinate per ODE step for
flows without a closed-form divergence (the SchNet flow, nODE), so ``n_samples`` and ``n_test`` are
profile settings. The simple gradient flow's pair potential has a closed-form divergence and
samples at O(N²) cost per evaluation.
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
from eqbench.tasks.common import (DISTANCE_UNIT, FINITE_ENERGY_UNIT, augmentation_cells, augmentation_reason,
                                  check_finite, check_kl_setting, check_sample_metric_settings, check_test_source,
                                  community_missing, community_missing_reason, forward_ess_records, fraction,
                                  guard_records, load_test_split, nll_records, positive_int, sample_quality_records,
                                  sample_with_log_q, score_log_q, show_progress, split_detail, train_flow,
                                  with_detail)

from eqbench.tasks.reporting import (
    NLL_CONVENTION,
    NOT_MEASURED,
    NOT_REPRODUCED,
    REPRODUCED,
    SAMPLE_METRIC_CONVENTION,
    Claim,
    ClaimResult,
    TaskSection,
    describe,
    fmt,
    has_capability,
    is_equivariant_flow,
    point,
    seed_stats,
    settings_name,
    short_name,
    with_settings,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas
    import torch

    from eqbench.flows.cnf import CNF
    from eqbench.train import TrainResult

__all__ = ["BGReweighting", "TASK", "FREE_ENERGY_SYSTEM", "energy_edges", "FINITE_ENERGY_UNIT",
           "check_reweighting_settings"]

#: The system whose pair-distance free energy is known exactly (two particles; paper Fig. 3b).
FREE_ENERGY_SYSTEM = "dw2"

#: Energy histogram range relative to the MCMC energies: from ``min - 0.1 span`` to
#: ``q99.9 + 1.0 span`` with ``span = q99.9 - min``; the long right margin keeps the high-energy
#: samples of poorly trained flows (Fig. 6b) in view.
ENERGY_MARGINS = (0.1, 1.0)

#: Unit of every ESS fraction this task records (see the module docstring).
ESS_UNIT = "fraction of all samples drawn (Kish; zero weights count, undefined weights count as drawn)"


def energy_edges(u_reference: np.ndarray, n_bins: int) -> np.ndarray:
    """Histogram edges from the reference (MCMC) energies alone, so every model of a system and
    every reweighting share them (see :data:`ENERGY_MARGINS`)."""
    import numpy as np

    lo, hi = float(u_reference.min()), float(np.quantile(u_reference, 0.999))
    span = max(hi - lo, 1e-6)
    return np.linspace(lo - ENERGY_MARGINS[0] * span, hi + ENERGY_MARGINS[1] * span, n_bins + 1)


def sample_cnf_log_q(
    flow: CNF,
    n: int,
    methods: tuple[str, ...],
    *,
    batch_size: int = 1000,
    seed: int = 0,
    progress: bool | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` samples of a CNF and their ``log q`` integrated with each divergence ``method``.

    Each batch of prior draws ``z`` is integrated once per method; the configurations of the first
    method are returned (the velocity does not depend on the divergence method, so with the
    fixed-step DTO solver every method yields the same configurations). Hutchinson noise is one
    Rademacher probe per sample, fixed along its trajectory (paper §7.1; Grathwohl et al. 2018).
    """
    import torch
    from tqdm.auto import tqdm

    flow.eval()
    ref = next(flow.parameters())
    generator = torch.Generator().manual_seed(seed)
    xs: list[torch.Tensor] = []
    log_qs: dict[str, list[torch.Tensor]] = {method: [] for method in methods}
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="sample", disable=not show_progress(progress), leave=False):
            z = flow.prior.sample(min(batch_size, n - start), generator=generator, dtype=ref.dtype, device=ref.device)
            log_rho = flow.prior.log_prob(z)
            for k, method in enumerate(methods):
                x, logdet = flow.integrate(z, 0.0, 1.0, method=method)
                if k == 0:
                    xs.append(x)
                log_qs[method].append(log_rho - logdet)
    return torch.cat(xs), {method: torch.cat(parts) for method, parts in log_qs.items()}


def _training_curve_records(ctx: CellContext, pretrained: TrainResult, mixed: TrainResult,
                            pretrain_iterations: int) -> list[Record]:
    """The logged training curve of both phases: ``nll_loss`` (one batch's NLL) at every logged
    step, and ``kl_loss`` (one sampled batch's KL - log Z) where the λ-mix weighs it (λ > 0).

    Steps count over both phases, the λ-mix's from ``pretrain_iterations`` on, so a cell's JSON
    shows where a run left the data (the λ-mix blow-ups of an unguarded coupling flow on LJ-13)
    without its snapshots, which go when the cell finishes.
    """
    records = []
    for offset, fit in ((0, pretrained), (pretrain_iterations, mixed)):
        for entry in fit.history:
            step = offset + int(entry["iteration"])
            records.append(ctx.record("nll_loss", entry["nll"], "nats, training estimator (one batch)",
                                      step=step))
            if entry["lambda"] > 0.0:
                records.append(ctx.record("kl_loss", entry["kl"], "kT, training estimator (KL - log Z, "
                                          "one sampled batch)", step=step))
    return records


def check_reweighting_settings(params: Mapping[str, Any]) -> None:
    """The settings :meth:`BGReweighting.reweighting_records` and the solver override read
    (``solver_steps``, ``free_energy_window``, ``distance_range``, ``model_config``,
    ``test_source``), shared with the ``evaluate`` task, which scores flows the same way."""
    steps = params.get("solver_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"solver_steps must be 0 (the model's default) or a positive integer, got {steps!r}")
    window = params.get("free_energy_window")
    if isinstance(window, bool) or not isinstance(window, int | float) or not 0 < window < math.inf:
        raise ConfigError(f"free_energy_window must be a finite positive number of kT, got {window!r}")
    bounds = params.get("distance_range")
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
            or not 0 <= bounds[0] < bounds[1] < math.inf):
        raise ConfigError(f"distance_range must be [low, high] with 0 <= low < high (finite), got {bounds!r}")
    if not isinstance(params.get("model_config", {}), Mapping):
        raise ConfigError(f"model_config must be a table of model settings, got {params.get('model_config')!r}")
    check_sample_metric_settings(params)
    check_kl_setting(params)
    check_test_source(params)


class BGReweighting(Task):
    """ML pre-training, then the ML/KL λ-mix; reweighted samples against MCMC (see the module docstring)."""

    name = "bg-reweighting"
    trains = True
    summary = ("ML then λ-mixed KL training; energy histograms, reweighting, ESS, W2; "
               "DW-2 free energy exact vs Hutchinson (paper §7.4, B.3, Fig. 3b, 6, 10)")
    #: ``harmonic``: the known-answer system (target = prior), for end-to-end checks.
    systems = ("dw2", "dw4", "lj13", "lj55", "harmonic")
    grid_axes = ("augment",)
    requires = ("trainable",)
    data_splits = {"n_train": "train", "n_test": "test"}

    # ------------------------------------------------------------------ settings
    def validate(self, params: Mapping[str, Any]) -> None:
        for key in ("n_train", "pretrain_iterations", "mix_iterations", "batch_size", "n_samples",
                    "sample_batch_size", "n_test", "n_bootstrap", "energy_bins", "distance_bins"):
            positive_int(params, key)
        fraction(params, "lambda_end")
        if not isinstance(params.get("augment"), bool):
            raise ConfigError(f"augment must be true or false (or a list of them), got {params.get('augment')!r}")
        check_reweighting_settings(params)

    def expand_cell(self, params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
        if community_missing(params, system):
            return []
        return augmentation_cells(params, model, system)

    def no_cells_reason(self, params: Mapping[str, Any], model: str, system: str) -> str:
        if community_missing(params, system):
            return community_missing_reason(system)
        return augmentation_reason(params, model)

    # ------------------------------------------------------------------ one cell
    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        """Training per configuration-step; a λ-mix step counts twice (the NLL batch plus a KL
        batch sampled through the flow with its training divergence). The exact NLL per scored
        configuration (n_train + n_test), sampling per sample with exact log q; the reweighting
        statistics are the remainder."""
        return {"train_wall_s": params["batch_size"] * (params["pretrain_iterations"] + 2 * params["mix_iterations"]),
                "score_wall_s": params["n_train"] + params["n_test"],
                "sample_wall_s": params["n_samples"],
                "sample_metrics_wall_s": params.get("coord_w2_aligned_samples", 0) ** 2}

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch

        from eqbench import metrics
        from eqbench.components import build_model
        from eqbench.data.loading import load_data
        from eqbench.flows.cnf import CNF

        p = ctx.params
        flow = build_model(ctx.model, ctx.system, p.get("model_config", {})).to(ctx.device)
        is_cnf = isinstance(flow, CNF)
        if is_cnf and p["solver_steps"]:
            flow.with_solver(steps=p["solver_steps"])
        dtype = next(flow.parameters()).dtype
        train = load_data(ctx.system, split="train", n=p["n_train"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        test = load_test_split(ctx, p["n_test"])  # float64 on the CPU: the reference statistics
        torch.manual_seed(ctx.seed)
        records = [ctx.record("n_parameters", flow.n_parameters, "count")]

        # -- training: ML pre-training, then λ rising 0 -> lambda_end (paper B.3)
        start = time.perf_counter()
        pretrained = train_flow(ctx, flow, train, iterations=p["pretrain_iterations"], batch_size=p["batch_size"],
                                augment=p["augment"])
        result = train_flow(ctx, flow, train, iterations=p["mix_iterations"], batch_size=p["batch_size"],
                            augment=p["augment"], lambda_start=0.0, lambda_end=p["lambda_end"], seed_offset=1)
        earlier = pretrained.earlier_wall_s + result.earlier_wall_s  # runs a resumed cell continued
        records.append(ctx.record("train_wall_s", time.perf_counter() - start + earlier, "s"))
        records += guard_records(ctx, pretrained, result)
        ctx.keep_model(flow)
        if result.history:
            last = result.history[-1]
            records.append(ctx.record("final_nll_loss", last["nll"], "nats, training estimator"))
            records.append(ctx.record("final_kl_loss", last["kl"], "kT, training estimator (KL - log Z)"))
        records += _training_curve_records(ctx, pretrained, result, p["pretrain_iterations"])
        start = time.perf_counter()
        records += nll_records(ctx, flow, train, "nll_train")
        test_on_device = test.to(device=ctx.device, dtype=dtype)
        scored_test = score_log_q(ctx, flow, test_on_device)
        records += nll_records(ctx, flow, test_on_device, "nll_test", scored=scored_test, detail=split_detail(p))
        records += forward_ess_records(ctx, flow, scored_test, ctx.system.energy(test), detail=split_detail(p))
        records.append(ctx.record("score_wall_s", time.perf_counter() - start, "s"))

        # -- sampling with exact log q (and the Hutchinson log q of the same samples on DW-2)
        start = time.perf_counter()
        free_energy = ctx.system.name == FREE_ENERGY_SYSTEM
        hutchinson = free_energy and is_cnf
        if hutchinson:
            x, log_qs = sample_cnf_log_q(flow, p["n_samples"], ("exact", "hutchinson"),
                                         batch_size=p["sample_batch_size"], seed=ctx.seed, progress=ctx.progress)
            log_q = log_qs["exact"]
        else:
            x, log_q = sample_with_log_q(flow, p["n_samples"], batch_size=p["sample_batch_size"], seed=ctx.seed,
                                         progress=ctx.progress)
        records.append(ctx.record("sample_wall_s", time.perf_counter() - start, "s"))
        log_q_hutch = metrics.as_array(log_qs["hutchinson"]) if hutchinson else None
        ctx.keep_samples(x, log_q, **({"log_q_hutchinson": log_q_hutch} if hutchinson else {}))
        records += self.reweighting_records(ctx, x, metrics.as_array(log_q), test, log_q_hutch)
        check_finite(records)
        return records

    def reweighting_records(self, ctx: CellContext, x: torch.Tensor, log_q: np.ndarray, test: torch.Tensor,
                            log_q_hutchinson: np.ndarray | None = None) -> list[Record]:
        """Everything computed from the flow samples ``x`` and their ``log q`` against the MCMC
        ``test`` set: counts, ESS, mean energies, histograms, W2s and (DW-2) free energies. The
        cell's ``test_source`` says which test split ``test`` is, for the units (see the module
        docstring; the caller loads it, :func:`eqbench.tasks.common.load_test_split`).

        Separate from :meth:`run_cell` so the counting convention of the module docstring (zero
        weights stay, undefined ones are left out and counted) is testable on hand-made samples.
        """
        import numpy as np
        import torch

        from eqbench import metrics

        x = x.detach().to("cpu", torch.float64)
        x_np = metrics.as_array(x)
        # A configuration with a non-finite coordinate has no defined energy (and no distances).
        u = np.where(np.isfinite(x_np).all(axis=(1, 2)), metrics.as_array(ctx.system.energy(x)), np.nan)
        iw = metrics.importance_weights(u, log_q)
        n = iw.n_total
        records = [
            ctx.record("n_samples", n, "count (flow samples drawn and scored)"),
            ctx.record("n_samples_zero_weight", iw.n_zero_weight, "count (u = +inf: weight 0, kept in every statistic)"),
            ctx.record("n_samples_undefined", iw.n_undefined,
                       "count (log q NaN/±inf or u NaN/-inf: left out, counted in the ESS denominator)"),
        ]
        if iw.n_zero_weight + iw.n_undefined == n:
            raise FloatingPointError(f"no flow sample has a positive importance weight ({iw.n_zero_weight} of {n} "
                                     f"have infinite energy, {iw.n_undefined} an undefined log q or energy)")
        x_ok, u_ok, log_w = x_np[iw.defined], u[iw.defined], iw.log_w

        # -- reweighting against the MCMC test set
        u_mcmc = metrics.as_array(ctx.system.energy(test))
        x_mcmc = metrics.as_array(test)
        records += self._energy_records(ctx, u_ok, log_w, u_mcmc, n)
        # energy W1/W2, distance W2, distance-histogram TV (flow and reweighted), coordinate W2s
        records += sample_quality_records(ctx, x_ok, u_ok, x_mcmc, u_mcmc, log_w=log_w,
                                          detail=split_detail(ctx.params))
        d = metrics.pair_distances(x_np)[:, 0] if ctx.system.name == FREE_ENERGY_SYSTEM else None
        estimates: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        if d is not None:
            estimates = {"flow": (d[iw.defined], None), "reweighted": (d[iw.defined], log_w)}
        if log_q_hutchinson is not None:
            iw_h = metrics.importance_weights(u, log_q_hutchinson)
            both = np.isfinite(log_q) & np.isfinite(log_q_hutchinson)
            records.append(ctx.record("n_samples_undefined_hutchinson", iw_h.n_undefined,
                                      "count (Hutchinson log q or u undefined: left out)"))
            records += self._hutchinson_records(ctx, u[iw_h.defined], iw_h.log_w, log_q_hutchinson[both] - log_q[both],
                                                n)
            if d is not None:
                estimates["hutchinson"] = (d[iw_h.defined], iw_h.log_w)
        if estimates:
            records += self._free_energy_records(ctx, estimates)
        return records

    def _energy_records(self, ctx: CellContext, u: np.ndarray, log_w: np.ndarray, u_mcmc: np.ndarray,
                        n_total: int) -> list[Record]:
        """ESS, mean energies with bootstrap errors, and the three energy histograms (Fig. 6, 10).

        ``u`` and ``log_w`` are of the samples with a defined weight (``u`` may be ``+inf`` where
        the weight is zero); ``n_total`` counts every sample drawn (the ESS denominator).
        On the community test split (``test_source``) the units of the reference statistics end
        with the split's description, and those of the flow statistics compared with them (mean
        energies, the flow / reweighted histograms on the reference's bins) name the reference;
        the reverse ESS depends on the flow samples alone and keeps its unit.
        """
        import numpy as np

        from eqbench import metrics

        p = ctx.params
        boot = {"n_resamples": p["n_bootstrap"], "seed": ctx.seed}
        on = split_detail(p)  # statistics of the test split itself
        vs = f"compared with mean_energy_mcmc of the {on}" if on else ""  # flow statistics beside them
        bins = f"bins from the energies of the {on}" if on else ""
        finite_u = u[np.isfinite(u)]
        records = [
            ctx.record("ess_fraction", metrics.ess_fraction(log_w, n_total=n_total), ESS_UNIT),
            ctx.record("mean_energy_flow", finite_u.mean(), with_detail(f"kT, {FINITE_ENERGY_UNIT}", vs)),
            ctx.record("mean_energy_flow_std", metrics.bootstrap_std(np.mean, finite_u, **boot),
                       with_detail(f"kT, bootstrap std, {FINITE_ENERGY_UNIT}", vs)),
            ctx.record("mean_energy_reweighted", metrics.weighted_mean(u, log_w), with_detail("kT", vs)),
            ctx.record("mean_energy_reweighted_std", metrics.bootstrap_std(_reweighted_mean, u, log_w, **boot),
                       with_detail("kT, bootstrap std", vs)),
            ctx.record("mean_energy_mcmc", u_mcmc.mean(), with_detail("kT", on)),
            ctx.record("mean_energy_mcmc_std", metrics.bootstrap_std(np.mean, u_mcmc, **boot),
                       with_detail("kT, bootstrap std", on)),
        ]
        edges = energy_edges(u_mcmc, p["energy_bins"])
        records.append(ctx.record("energy_fraction_above_range", float((u > edges[-1]).mean()),
                                  with_detail("fraction of samples", bins)))
        records += [ctx.record("energy_edge", e, with_detail("kT", bins), step=k) for k, e in enumerate(edges)]
        for name, values, weights in (("flow", u, None), ("reweighted", u, log_w), ("mcmc", u_mcmc, None)):
            density = metrics.histogram_density(values, edges, weights)
            unit = with_detail("1/kT (density)", on if name == "mcmc" else bins)
            records += [ctx.record(f"energy_hist_{name}", v, unit, step=k) for k, v in enumerate(density)]
        return records

    def _hutchinson_records(self, ctx: CellContext, u: np.ndarray, log_w: np.ndarray, log_q_error: np.ndarray,
                            n_total: int) -> list[Record]:
        """Reweighting with a Hutchinson ``log q`` of the same samples (paper §7.1, Fig. 3b); ``u``
        and ``log_w`` of the samples whose Hutchinson weight is defined, ``n_total`` all drawn."""
        from eqbench import metrics

        boot = {"n_resamples": ctx.params["n_bootstrap"], "seed": ctx.seed}
        return [
            ctx.record("ess_fraction_hutchinson", metrics.ess_fraction(log_w, n_total=n_total), ESS_UNIT),
            ctx.record("mean_energy_hutchinson", metrics.weighted_mean(u, log_w), "kT"),
            ctx.record("mean_energy_hutchinson_std", metrics.bootstrap_std(_reweighted_mean, u, log_w, **boot),
                       "kT, bootstrap std"),
            ctx.record("log_q_hutchinson_error_std", log_q_error.std(), "nats (Hutchinson - exact log q)"),
        ]

    def _free_energy_records(self, ctx: CellContext,
                             estimates: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> list[Record]:
        """Exact and estimated ``F(d)`` per bin with bootstrap std, and their RMSE (Fig. 3b).

        ``estimates`` maps a name to ``(distances, log-weights or None)`` of the samples that
        estimate uses (those with a defined weight; zero weights included)."""
        import numpy as np

        from eqbench import metrics

        p = ctx.params
        system = ctx.system
        edges = np.linspace(*map(float, p["distance_range"]), p["distance_bins"] + 1)

        def pair_energy(dist: np.ndarray) -> np.ndarray:
            import torch

            f, _, _ = system.pair_potential(torch.from_numpy(dist))
            return system.pair_multiplicity * f.numpy()

        exact = metrics.radial_free_energy(edges, pair_energy, system.n_dims)
        shift = exact.min()
        window = exact - shift <= p["free_energy_window"]
        records = [ctx.record("distance_edge", e, DISTANCE_UNIT, step=k) for k, e in enumerate(edges)]
        records += [ctx.record("free_energy_exact", v - shift, "kT", step=k) for k, v in enumerate(exact)]
        boot = {"n_resamples": p["n_bootstrap"], "seed": ctx.seed}

        def profile(dist: np.ndarray, lw: np.ndarray | None = None) -> np.ndarray:
            if lw is not None and not np.isfinite(lw).any():  # a bootstrap resample of zero weights only
                return np.full(len(edges) - 1, np.inf)
            return metrics.free_energy_profile(dist, edges, lw)

        for name, (d, log_w) in estimates.items():
            arrays = (d,) if log_w is None else (d, log_w)
            estimate = profile(*arrays) - shift
            std = metrics.bootstrap_std(profile, *arrays, **boot)
            ok = np.isfinite(estimate)
            records += [ctx.record(f"free_energy_{name}", estimate[k], "kT", step=k) for k in np.flatnonzero(ok)]
            records += [ctx.record(f"free_energy_{name}_std", std[k], "kT, bootstrap std", step=k)
                        for k in np.flatnonzero(ok & np.isfinite(std))]
            covered = window & ok
            records.append(ctx.record(f"free_energy_coverage_{name}", covered.sum() / window.sum(),
                                      f"fraction of bins within {p['free_energy_window']:g} kT of the minimum"))
            if covered.any():
                rmse = np.sqrt(np.mean(np.square(estimate[covered] - (exact[covered] - shift))))
                records.append(ctx.record(f"free_energy_rmse_{name}", rmse, "kT, covered bins"))
        return records

    # ------------------------------------------------------------------ figures
    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """Energy histograms per system (flow, reweighted, MCMC; one panel per model variant, Fig. 6,
        10) and, for DW-2, the free-energy profiles with bootstrap bands (Fig. 3b). Each panel shows
        the lowest seed of its model variant (bins depend on that seed's test subset). Then the
        training curves of every cell (``training_<system>``), where a λ-mix that leaves the data
        shows."""
        written: list[Path] = []
        for system, rows in table.groupby("system", sort=True):
            panels = _panels(rows)
            if any("energy_hist_mcmc" in set(cell["metric"]) for _, cell in panels):
                written += _plot_energy(system, panels, out_dir)
            if any("free_energy_exact" in set(cell["metric"]) for _, cell in panels):
                written += _plot_free_energy(system, panels, out_dir)
            curves = rows[rows["metric"].isin(("nll_loss", "kl_loss")) & rows["step"].notna()]
            if (curves["metric"] == "nll_loss").any():
                written += _plot_training(str(system), curves, out_dir)
        return written

    def report_section(self) -> TaskSection:
        """Headline ESS, mean energies and free-energy errors per settings key beside §7.4 and the
        peer's ESS; decides the reweighting and the exact-divergence claims."""
        return _report_section()


def _reweighted_mean(values: np.ndarray, log_w: np.ndarray) -> float:
    """:func:`eqbench.metrics.weighted_mean` of one bootstrap resample; NaN (skipped by
    :func:`eqbench.metrics.bootstrap_std`) when the resample drew only zero weights."""
    import numpy as np

    from eqbench import metrics

    return metrics.weighted_mean(values, log_w) if np.isfinite(log_w).any() else float("nan")


def _panels(rows: pandas.DataFrame) -> list[tuple[str, pandas.DataFrame]]:
    """``(label, rows of the lowest seed)`` per settings key, sorted by label.

    One panel per settings key, never per (model, variant): cells of two profiles or two settings
    share a model and a seed, and pooling their stepped histograms would draw nothing sensible.
    The label is the model variant plus what else differs (``settings``; n_train and profile when
    they vary)."""
    rows = with_settings(rows) if "settings" not in rows.columns else rows
    vary_n = rows["n_train"].nunique(dropna=False) > 1
    vary_profile = rows["profile"].nunique() > 1
    panels = []
    for _, group in rows.groupby("settings_key", sort=False):
        first = group.iloc[0]
        label = short_name(first)
        if vary_n:
            label += f" n_train={first['n_train']}"
        if vary_profile:
            label += f" [{first['profile']}]"
        seed = group["seed"].min()
        panels.append((label, group[group["seed"] == seed]))
    return sorted(panels, key=lambda panel: panel[0])


def _series(cell: pandas.DataFrame, metric: str) -> pandas.Series:
    """Stepped records of one metric as a Series indexed by step."""
    rows = cell[cell["metric"] == metric]
    return rows.set_index(rows["step"].astype(int))["value"].sort_index()


def _scalar(cell: pandas.DataFrame, metric: str) -> float:
    values = cell.loc[cell["metric"] == metric, "value"]
    return float(values.iloc[0]) if len(values) else float("nan")


def _plot_energy(system: str, panels: list[tuple[str, pandas.DataFrame]], out_dir: Path) -> list[Path]:
    from eqbench.plots import new_figure, save_figure

    fig, axes = new_figure(len(panels), width=3.8, height=3.2)
    for ax, (label, cell) in zip(axes, panels):
        edges = _series(cell, "energy_edge").to_numpy()
        for metric, name, style in (("energy_hist_mcmc", "MCMC", {"color": "0.3", "linewidth": 2.0}),
                                    ("energy_hist_flow", "flow", {"color": "C0"}),
                                    ("energy_hist_reweighted", "reweighted", {"color": "C1", "linestyle": "--"})):
            density = _series(cell, metric).to_numpy()
            if len(density) == len(edges) - 1:
                ax.stairs(density, edges, label=name, **style)
        title = (f"{label}\nESS {_scalar(cell, 'ess_fraction'):.3f}; ⟨u⟩ rew "
                 f"{_scalar(cell, 'mean_energy_reweighted'):.2f} vs MCMC {_scalar(cell, 'mean_energy_mcmc'):.2f}")
        above = _scalar(cell, "energy_fraction_above_range")
        if above > 0.005:
            title += f"\nflow samples beyond the range: {above:.0%}"
        ax.set_title(title, fontsize="small")
        ax.set_xlabel("energy u (kT)")
        ax.set_ylabel("density")
        ax.legend(fontsize="x-small")
    return save_figure(fig, out_dir, f"energy_histograms_{system}")


def _plot_training(system: str, curves: pandas.DataFrame, out_dir: Path) -> list[Path]:
    """The training NLL (both phases) and KL term (the λ-mix) against iteration, one line per
    settings key and seed. Where a run blew up (beyond ±1,000), a symmetric-log axis, linear
    within ±100, keeps the ordinary range readable beside it."""
    from eqbench.plots import new_figure, save_figure
    from eqbench.tasks.reporting import draw_curves

    fig, axes = new_figure(2, width=4.6, height=3.4)
    for ax, metric, label in ((axes[0], "nll_loss", "NLL per batch (nats)"),
                              (axes[1], "kl_loss", "⟨u + log q⟩ per batch (kT)")):
        rows = curves[curves["metric"] == metric]
        draw_curves(ax, rows)
        if not rows.empty and rows["value"].abs().max() > 1e3:
            ax.set_yscale("symlog", linthresh=100.0)
        ax.set_xlabel("iteration (ML, then the λ-mix)")
        ax.set_ylabel(label)
        if not rows.empty:
            ax.legend(fontsize="x-small")
    axes[0].set_title(f"{system}: training NLL", fontsize="small")
    axes[1].set_title(f"{system}: KL term where λ > 0", fontsize="small")
    return save_figure(fig, out_dir, f"training_{system}")


def _plot_free_energy(system: str, panels: list[tuple[str, pandas.DataFrame]], out_dir: Path) -> list[Path]:
    from eqbench.plots import new_figure, save_figure

    panels = [(label, cell) for label, cell in panels if "free_energy_exact" in set(cell["metric"])]
    fig, axes = new_figure(len(panels), width=3.8, height=3.2)
    for ax, (label, cell) in zip(axes, panels):
        edges = _series(cell, "distance_edge").to_numpy()
        centres = 0.5 * (edges[1:] + edges[:-1])
        exact = _series(cell, "free_energy_exact")
        ax.plot(centres[exact.index], exact.to_numpy(), color="0.2", linewidth=2.0, label="exact")
        for name, text, color in (("flow", "flow, not reweighted", "C2"), ("reweighted", "reweighted, exact div", "C0"),
                                  ("hutchinson", "reweighted, Hutchinson", "C3")):
            f = _series(cell, f"free_energy_{name}")
            if f.empty:
                continue
            std = _series(cell, f"free_energy_{name}_std").reindex(f.index).fillna(0.0).to_numpy()
            ax.plot(centres[f.index], f.to_numpy(), color=color, label=text)
            ax.fill_between(centres[f.index], f.to_numpy() - std, f.to_numpy() + std, color=color, alpha=0.25)
        ax.set_ylim(-1.0, 12.0)
        ax.set_title(label, fontsize="small")
        ax.set_xlabel("particle distance d")
        ax.set_ylabel("free energy F(d) (kT)")
        ax.legend(fontsize="x-small")
    return save_figure(fig, out_dir, f"free_energy_{system}")


# -- report (what eqbench.report shows of this task) --------------------------------------------

_REWEIGHTING_METRICS = ("mean_energy_reweighted", "mean_energy_reweighted_std", "mean_energy_mcmc",
                        "mean_energy_mcmc_std", "ess_fraction")


def claim_reweighting(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """Reweighting works for equivariant flows only (§7.4, Fig. 6, 10).

    Judged per system for every settings key of a model with capability ``equivariant``.
    Thresholds: reproduced when its reweighted mean energy (mean over seeds) agrees with the MCMC
    mean within 3 combined bootstrap standard deviations (sqrt(σ_rw² + σ_mcmc²), each σ the mean
    over seeds of the bootstrap std recorded in the cell) or within 0.05 kT, *and* its ESS
    fraction (mean over seeds) exceeds that of every settings key of every model without
    ``equivariant`` on the same system (with and without augmentation: the paper's
    non-equivariant flows reweight with a handful of effective samples). A system without
    non-equivariant rows is judged on the agreement alone. Every equivariant settings key must pass.
    """
    rows = ok[(ok["task"] == "bg-reweighting") & ok["step"].isna()]
    stats = seed_stats(rows, _REWEIGHTING_METRICS)
    rw = stats[stats["metric"] == "mean_energy_reweighted"]
    eq_rw = rw[is_equivariant_flow(rw)]
    if eq_rw.empty:
        return ClaimResult(NOT_MEASURED, "needs bg-reweighting mean energies of a model with capability "
                                         "'equivariant'.")
    lookup = {(r["settings_key"], r["metric"]): r for _, r in stats.iterrows()}
    ess_rows = stats[stats["metric"] == "ess_fraction"]
    neq_ess = ess_rows[~has_capability(ess_rows, "equivariant")]

    def mean(key: str, metric: str) -> float:
        r = lookup.get((key, metric))
        return math.nan if r is None else float(r["mean"])

    parts, points, passed = [], [], True
    for _, e in eq_rw.iterrows():
        key, system = e["settings_key"], e["system"]
        mc = mean(key, "mean_energy_mcmc")
        if math.isnan(mc):
            continue
        rw_s, mc_s = mean(key, "mean_energy_reweighted_std"), mean(key, "mean_energy_mcmc_std")
        sigma = math.hypot(0.0 if math.isnan(rw_s) else rw_s, 0.0 if math.isnan(mc_s) else mc_s)
        diff = abs(float(e["mean"]) - mc)
        agree = diff <= max(3 * sigma, 0.05)
        ess = lookup.get((key, "ess_fraction"))
        others = neq_ess[neq_ess["system"] == system]
        ess_ok = ess is not None and all(float(ess["mean"]) > float(o["mean"]) for _, o in others.iterrows())
        passed = passed and agree and ess_ok
        nsig = f"{diff / sigma:.1f}σ" if sigma > 0 else "σ unknown"
        parts.append(f"{system} {settings_name(e)}: reweighted ⟨u⟩ {describe(e)} vs MCMC {fmt(mc)} "
                     f"(|Δ| {fmt(diff, 2)} kT, {nsig}), ESS {describe(ess, 3) if ess is not None else '–'}"
                     + ("" if agree else " — disagrees") + ("" if ess_ok else " — ESS not the highest"))
        if ess is not None:
            points.append(point(ess, short_name(ess, system=True)))
    if not parts:
        return ClaimResult(NOT_MEASURED, "the equivariant models' bg-reweighting rows lack MCMC mean energies.")
    if not neq_ess.empty:
        parts.append("without 'equivariant': " + "; ".join(
            f"{o['system']} {settings_name(o)} ESS {describe(o, 3)}" for _, o in neq_ess.iterrows()))
        points += [point(o, short_name(o, system=True)) for _, o in neq_ess.iterrows()]
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, "; ".join(parts) + ".", tuple(points),
                       "ESS fraction")


def claim_exact_divergence(ok: pandas.DataFrame, baselines: pandas.DataFrame) -> ClaimResult:
    """Exact divergence is needed for reweighting (§7.1, Fig. 3b).

    For every settings key of a model with capability ``cnf`` that recorded both free-energy
    RMSEs (DW-2 profile against the exact one): reproduced when the RMSE of the profile reweighted
    with the exact log q is smaller than with the one-probe Hutchinson log q of the same samples
    (each the mean over seeds), for every such settings key.
    """
    rows = ok[(ok["task"] == "bg-reweighting") & ok["step"].isna()]
    stats = seed_stats(rows, ["free_energy_rmse_reweighted", "free_energy_rmse_hutchinson"])
    stats = stats[has_capability(stats, "cnf")]
    parts, points, passed = [], [], True
    for _, g in stats.groupby("settings_key", sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        exact, hutch = by.get("free_energy_rmse_reweighted"), by.get("free_energy_rmse_hutchinson")
        if exact is None or hutch is None:
            continue
        passed = passed and float(exact["mean"]) < float(hutch["mean"])
        parts.append(f"{exact['system']} {settings_name(exact)}: RMSE exact {describe(exact, 3)} vs "
                     f"Hutchinson {describe(hutch, 3)} kT")
        name = short_name(exact, system=True)
        points += [point(exact, f"{name}: exact"), point(hutch, f"{name}: Hutchinson")]
    if not parts:
        return ClaimResult(NOT_MEASURED, "needs bg-reweighting rows with free_energy_rmse_reweighted and "
                                         "free_energy_rmse_hutchinson of a model with capability 'cnf' (dw2).")
    return ClaimResult(REPRODUCED if passed else NOT_REPRODUCED, "; ".join(parts) + ".", tuple(points),
                       "free-energy RMSE (kT)")


def _report_section() -> TaskSection:
    return TaskSection(
        task="bg-reweighting",
        title="Boltzmann generator: reweighting to the target",
        paper="§7.4, B.3, Fig. 3b, 6, 10",
        conventions="Energies in kT (reduced units). ESS is Kish's (Σw)²/Σw² as a fraction of all samples "
                    "drawn (a clash, u = +∞, is a weight of zero and counts), log w = −u − log q. Mean energies of the flow samples, the reweighted samples and "
                    "the MCMC test set; the 'cell error' column is the mean over seeds of the bootstrap standard "
                    "deviation recorded in the cell. DW-2 free-energy RMSEs are against the exact profile, "
                    "reweighted with the exact log q ('reweighted') and with a one-probe Hutchinson log q "
                    "('hutchinson'). " + SAMPLE_METRIC_CONVENTION + " " + NLL_CONVENTION,
        metrics=("ess_fraction", "forward_ess_fraction", "ess_fraction_hutchinson", "mean_energy_flow", "mean_energy_reweighted",
                 "mean_energy_mcmc", "mean_energy_hutchinson", "free_energy_rmse_flow",
                 "free_energy_rmse_reweighted", "free_energy_rmse_hutchinson", "energy_w1_flow", "energy_w2_flow",
                 "energy_w1_reweighted", "energy_w2_reweighted", "dist_tv_flow", "dist_tv_reweighted",
                 "coord_w2_flow", "coord_w2_aligned_flow", "nll_train", "nll_test", "kl_test", "kl_test_stderr"),
        baseline=lambda r: r["table"] == "§7.4" or r["metric"] == "reverse_ess",
        claims=(Claim("reweighting", "Reweighting works for equivariant flows only", "§7.4, Fig. 6, 10",
                      claim_reweighting, needs=("equivariant",)),
                Claim("exact-divergence", "Exact divergence is needed for reweighting", "§7.1, Fig. 3b",
                      claim_exact_divergence, needs=("cnf",))),
        order=2,
    )


TASK = BGReweighting()
