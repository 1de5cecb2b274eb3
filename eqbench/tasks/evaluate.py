"""``evaluate``: score a flow that is already trained, with the metrics of the training tasks.

A researcher brings a flow trained elsewhere (a registered model with a checkpoint, a cell's kept
model, or an object in Python: :func:`eqbench.evaluation.evaluate`) and wants it scored by the same
protocol as the paper's models, without eqbench training it further: a single optimiser step at
a learning rate the flow was not made for can undo its training. This task never trains.

Per cell (one flow, one system, one seed):

- ``nll_train`` (``n_train_eval`` configurations of the training pool), ``nll_val`` (``n_val``
  of the validation split) and ``nll_test`` (``n_test`` of the test set): the same NLL as every
  task (:func:`eqbench.tasks.common.nll_records`: exact, or real NVP's importance-weighted
  estimate, saying which in the unit; SPEC §1);
- ``n_samples`` flow samples with their exact ``log q`` (or the samples a cell kept, with
  ``samples = "saved"``: re-scoring without drawing), reweighted against ``n_reference`` MCMC
  test configurations exactly as ``bg-reweighting`` does (paper §7.4, B.3):
  ESS, mean energies with bootstrap errors, energy histograms, the energy and pair-distance W2s,
  and on DW-2 the free-energy profile along the distance
  (:meth:`eqbench.tasks.bg_reweighting.BGReweighting.reweighting_records`).

``test_source`` (:func:`eqbench.tasks.common.load_test_split`): ``"eqbench"`` (every profile)
scores ``nll_test`` and takes the ``n_reference`` configurations from eqbench's own test split;
``"community"`` takes both from the community (EFM/DEM) test split of the same target (dw4, lj13;
CoM removed on load, its flaws reported by ``eqbench data --source community``), so a flow trained
elsewhere can be placed beside that lineage's published numbers. The records computed on or
compared with that split say so in their units, as in ``bg-reweighting``; ``nll_train`` and
``nll_val`` stay on eqbench's splits. A system without a community split makes no cell (the
request is refused with the reason).

What was scored is part of the cell's identity (``source``: the checkpoint's or kept model's
SHA-256, or the state of a Python object), so two different checkpoints never share a cell and the
same checkpoint is never scored twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import Record
from eqbench.tasks.base import CellContext, Task
from eqbench.tasks.bg_reweighting import check_reweighting_settings
from eqbench.tasks.common import (check_finite, community_missing, community_missing_reason, load_test_split,
                                  nll_records, positive_int, sample_with_log_q, split_detail)
from eqbench.tasks.reporting import NLL_CONVENTION, TaskSection

if TYPE_CHECKING:
    from eqbench.flows.base import Flow

__all__ = ["Evaluate", "TASK", "SAMPLE_SOURCES", "SOURCE_KINDS"]

#: Where the scored samples come from: drawn now from the flow, or those a cell kept.
SAMPLE_SOURCES = ("draw", "saved")
#: What is scored: a model as its builder builds it (the builder may load weights itself), a
#: model plus a checkpoint file, a cell's kept model, or a Python object.
SOURCE_KINDS = ("built", "checkpoint", "cell", "object")

#: Metrics the report's evaluate section shows (mean ± std over seeds per settings key).
HEADLINE = ("nll_train", "nll_val", "nll_test", "ess_fraction", "mean_energy_reweighted", "mean_energy_mcmc",
            "energy_w2_flow", "distance_w2_flow", "n_parameters")


class Evaluate(Task):
    """Scores an already-trained flow: NLLs on every split and the reweighting metrics (see module)."""

    name = "evaluate"
    summary = ("score a flow trained elsewhere (checkpoint, a cell's kept model, a Python object): NLL on "
               "train/val/test, reweighting, ESS, W2, energy histograms; never trains")
    systems = None
    data_splits = {"n_train_eval": "train", "n_val": "val", "n_test": "test", "n_reference": "test"}

    def validate(self, params: Mapping[str, Any]) -> None:
        for key in ("n_train_eval", "n_val", "n_test", "n_samples", "sample_batch_size", "n_reference",
                    "n_bootstrap", "energy_bins", "distance_bins"):
            positive_int(params, key)
        if params.get("samples") not in SAMPLE_SOURCES:
            raise ConfigError(f"samples must be one of {', '.join(SAMPLE_SOURCES)}, got {params.get('samples')!r}")
        source = params.get("source")
        if not isinstance(source, Mapping) or source.get("kind") not in SOURCE_KINDS:
            raise ConfigError(f"evaluate needs a source with kind one of {', '.join(SOURCE_KINDS)} "
                              "(use eqbench.evaluate or `eqbench evaluate`)")
        if source["kind"] in ("checkpoint", "cell") and not (source.get("path") and source.get("sha256")):
            raise ConfigError(f"a {source['kind']} source needs its path and SHA-256: use eqbench.evaluate "
                              "or `eqbench evaluate --checkpoint/--cell`")
        if params["samples"] == "saved" and source.get("kind") != "cell":
            raise ConfigError("samples = \"saved\" re-scores a cell's kept samples: evaluate a cell (--cell)")
        check_reweighting_settings(params)  # scored as bg-reweighting scores: the same settings (test_source too)

    def expand_cell(self, params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
        return [] if community_missing(params, system) else [dict(params)]

    def no_cells_reason(self, params: Mapping[str, Any], model: str, system: str) -> str:
        if community_missing(params, system):
            return community_missing_reason(system)
        return super().no_cells_reason(params, model, system)

    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        return {"score_wall_s": params["n_train_eval"] + params["n_val"] + params["n_test"],
                "sample_wall_s": params["n_samples"] if params["samples"] == "draw" else 0}

    def load_flow(self, ctx: CellContext) -> Flow:
        """The flow the cell scores: the object handed over in ``ctx.extras["flow"]``, a cell's
        kept model, a model with a checkpoint, or the model as its builder builds it."""
        from eqbench.artifacts import load_model
        from eqbench.components import build_model
        from eqbench.flows.flat import load_checkpoint

        if "flow" in ctx.extras:
            return ctx.extras["flow"]
        source = ctx.params["source"]
        if source["kind"] == "object":
            raise ConfigError("an object source is scored only by eqbench.evaluate(flow, ...) in Python")
        if source["kind"] == "cell":
            flow, _ = load_model(source["path"], device=ctx.device)
            return flow
        flow = build_model(ctx.model, ctx.system, ctx.params.get("model_config", {}))
        if source["kind"] == "checkpoint":
            load_checkpoint(flow, source["path"])
        return flow.to(ctx.device)

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import numpy as np
        import torch

        from eqbench import metrics
        from eqbench.artifacts import load_samples
        from eqbench.data.loading import load_data
        from eqbench.flows.cnf import CNF
        from eqbench.tasks.bg_reweighting import TASK as REWEIGHTING

        p = ctx.params
        flow = self.load_flow(ctx).eval()
        if isinstance(flow, CNF) and p["solver_steps"]:
            flow.with_solver(steps=p["solver_steps"])
        dtype = next(flow.parameters()).dtype
        records = [ctx.record("n_parameters", flow.n_parameters, "count")]
        start = time.perf_counter()
        for split, key, metric in (("train", "n_train_eval", "nll_train"), ("val", "n_val", "nll_val")):
            x = load_data(ctx.system, split=split, n=p[key], seed=ctx.seed, dtype=dtype, device=ctx.device)
            records += nll_records(ctx, flow, x, metric)
        test = load_test_split(ctx, p["n_test"], dtype=dtype, device=ctx.device)
        records += nll_records(ctx, flow, test, "nll_test", detail=split_detail(p))
        records.append(ctx.record("score_wall_s", time.perf_counter() - start, "s"))

        start = time.perf_counter()
        if p["samples"] == "saved":
            saved = load_samples(p["source"]["path"])
            x, log_q = torch.from_numpy(saved["x"]).to(torch.float64), np.asarray(saved["log_q"], dtype=np.float64)
            records.append(ctx.record("n_samples_saved", len(x), "count (samples a cell kept, re-scored)"))
        else:
            x, log_q_t = sample_with_log_q(flow, p["n_samples"], batch_size=p["sample_batch_size"], seed=ctx.seed,
                                           progress=ctx.progress)
            log_q = metrics.as_array(log_q_t)
            records.append(ctx.record("sample_wall_s", time.perf_counter() - start, "s"))
            ctx.keep_samples(x, log_q)
        reference = load_test_split(ctx, p["n_reference"])  # float64 on the CPU
        records += REWEIGHTING.reweighting_records(ctx, x, log_q, reference)
        check_finite(records)
        return records

    def report_section(self) -> TaskSection:
        """The headline numbers of every evaluated flow, per settings key (no claims: the paper
        made none about flows trained elsewhere)."""
        return TaskSection(
            task=self.name,
            title="Evaluated flows",
            paper="§7.3-7.4 scoring of flows trained elsewhere",
            conventions=NLL_CONVENTION + " Samples are reweighted against the MCMC test set as in bg-reweighting; "
                                         "the flow was not trained by eqbench (source in the settings).",
            metrics=HEADLINE,
            no_baseline="The paper published no numbers for flows trained elsewhere.",
            order=60.0,
        )


TASK = Evaluate()
