"""``dto-vs-otd``: discretise-then-optimise vs optimise-then-discretise training (paper §7.2, Fig. 4).

Paper §7.2 trains the DW-4 flow two ways and finds (Fig. 4a) about the same test likelihood,
while (Fig. 4b) the adaptive OTD solver needs more and more function evaluations per iteration
as training goes on, and the fixed-grid DTO solver stays flat:

* **DTO**: fixed-grid RK4 with 20 steps (80 evaluations per solve), gradients by backpropagating
  through the solver's operations (Gholami et al.).
* **OTD**: dopri5 with atol 1e-10, rtol 1e-5 and gradients by the adjoint method (Chen et al.
  2018, Grathwohl et al. 2018); its step count adapts to the stiffness of the field.

Protocol: ``solver`` is a grid axis (one cell per solver and seed, ``variant`` = the solver).
Each cell seeds torch with the cell's seed, builds the model with ``model_config`` plus the
solver, draws ``n_train`` training configurations (seeded), and trains ``iterations`` steps of
maximum likelihood with the common loop (:func:`eqbench.train.fit`: AdamW, lr 5e-3, weight
decay 0.01, batch 64, paper C.1), so both solvers see the same initial model and the same
batches. The paper runs 3 seeds per method (C.7).

* Function evaluations per training iteration (``nfe_per_iteration``, stepped by iteration):
  forward solve plus, for OTD, the adjoint's backward solve (DTO's backward pass is autograd
  through the 80 recorded evaluations and calls the field no further time). The forward solve
  alone is ``nfe_forward_per_iteration``. ``nfe_growth`` / ``nfe_forward_growth``: mean over the
  last tenth of the iterations divided by the mean over the first tenth.
* Test NLL (``nll_test``) on ``n_test`` configurations of the independent test set, exact
  divergence (closed form for the kernel flow, brute force for the others, SPEC §4), integrated
  for *both* solvers by the same reference solver ``eval_solver``: ``otd`` = dopri5 at the
  model's atol/rtol (default 1e-10 / 1e-5, the tighter of the two; no adjoint needed without
  gradients), or ``dto`` = RK4 with ``eval_steps`` steps. ``nll_test_train_solver`` is the NLL
  with the solver the model was trained with (for DTO it differs from the reference by the
  RK4-20 discretisation error).

Precision: ``dtype`` (default float64) is applied to both solvers. With atol 1e-10 dopri5 asks
for more than float32 can resolve: measured on DW-4 with the kernel flow, float32 OTD took
1,000-2,000 evaluations per iteration (the adjoint's error control chasing rounding noise) and
4-9 s per iteration; float64 took 190-400 and about 1 s, growing steadily during training as in
Fig. 4b. Models: trainable continuous flows (capabilities ``cnf`` and ``trainable``) on ``dw4``,
the system of Fig. 4.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.errors import ConfigError
from eqbench.records import Record
from eqbench.tasks.base import CellContext, Task
from eqbench.tasks.common import check_finite, nll_records, positive_int, training_options

from eqbench.tasks.reporting import TaskSection

if TYPE_CHECKING:
    import pandas

    from eqbench.flows.cnf import CNF

__all__ = ["DtoVsOtd", "TASK", "SOLVERS", "growth", "ForwardNfeLog"]

#: Training solvers compared (paper §7.2).
SOLVERS = ("dto", "otd")
#: Settings that the task sets itself and ``model_config`` must not carry.
_TASK_OWNED = {"solver": "the grid axis `solver`", "dtype": "the setting `dtype`"}


def growth(values: list[float], fraction: float = 0.1) -> tuple[float, float, float]:
    """``(mean of the first fraction, mean of the last fraction, last / first)`` of a series.

    Why means over a tenth rather than single iterations: the adaptive solver's count jumps by
    ±20 % between neighbouring iterations (measured), so end points alone are noisy.
    """
    if not values:
        raise ValueError("growth of an empty series")
    k = max(1, int(round(fraction * len(values))))
    first = sum(values[:k]) / k
    last = sum(values[-k:]) / k
    return first, last, (last / first if first else math.nan)


class ForwardNfeLog:
    """Records the forward-solve evaluations (``last_solve_nfe``) of every solve of a CNF.

    :func:`eqbench.train.fit` logs only the total per iteration (forward + adjoint); the split
    is what tells the adaptive solver's growing step count (forward) from its adjoint's. This
    wraps the flow's ``integrate`` on the instance for the duration of a ``with`` block and
    restores the class method afterwards; nothing else about the flow changes.
    """

    def __init__(self, flow: CNF):
        self.flow = flow
        self.nfe: list[int] = []

    def __enter__(self) -> ForwardNfeLog:
        original: Callable = self.flow.integrate

        def integrate(*args: Any, **kwargs: Any):
            out = original(*args, **kwargs)
            self.nfe.append(int(self.flow.last_solve_nfe))
            return out

        self.flow.__dict__["integrate"] = integrate  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc: object) -> None:
        self.flow.__dict__.pop("integrate", None)


class DtoVsOtd(Task):
    """Test NLL and function evaluations per iteration, DTO vs OTD training, DW-4."""

    name = "dto-vs-otd"
    trains = True
    summary = "test NLL and function evaluations per iteration, DTO vs OTD training on DW-4 (paper §7.2, Fig. 4)"
    systems = ("dw4",)
    grid_axes = ("solver",)
    requires = ("cnf", "trainable")
    data_splits = {"n_train": "train", "n_test": "test"}

    def validate(self, params: Mapping[str, Any]) -> None:
        if params.get("solver") not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)} (or a list of them), got {params.get('solver')!r}")
        if params.get("eval_solver") not in SOLVERS:
            raise ConfigError(f"eval_solver must be one of {', '.join(SOLVERS)}, got {params.get('eval_solver')!r}")
        for key in ("n_train", "n_test", "iterations", "batch_size", "log_every", "eval_steps", "eval_batch_size"):
            positive_int(params, key)
        if params.get("dtype") not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {params.get('dtype')!r}")
        config = params.get("model_config", {})
        if not isinstance(config, Mapping):
            raise ConfigError(f"model_config must be a table of model settings, got {config!r}")
        for key, owner in _TASK_OWNED.items():
            if key in config:
                raise ConfigError(f"model_config must not set {key!r} in task {self.name}: use {owner}")

    def expand_cell(self, params: Mapping[str, Any], model: str, system: str) -> list[dict[str, Any]]:
        """One cell per solver, named by its ``variant`` (``dto`` / ``otd``)."""
        return [dict(params, variant=params["solver"])]

    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        """Training per configuration-step, the test NLL per test configuration. OTD's
        evaluations per iteration grow during training (Fig. 4), so scaling a short OTD run to
        a longer one underestimates it."""
        return {"train_wall_s": params["iterations"] * params["batch_size"], "eval_wall_s": params["n_test"]}

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch

        from eqbench.components import build_model
        from eqbench.data.loading import load_data
        from eqbench.train import TrainConfig, fit

        p = ctx.params
        torch.manual_seed(ctx.seed)
        config = dict(p.get("model_config", {}), solver=p["solver"], dtype=p["dtype"])
        flow = build_model(ctx.model, ctx.system, config).to(ctx.device)
        dtype = next(flow.parameters()).dtype
        train = load_data(ctx.system, "train", n=p["n_train"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        test = load_data(ctx.system, "test", n=p["n_test"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        train_config = TrainConfig(iterations=p["iterations"], batch_size=p["batch_size"],
                                   **training_options(p), seed=ctx.seed, log_every=p["log_every"])
        start = time.perf_counter()
        with ForwardNfeLog(flow) as forward:
            result = fit(flow, ctx.system, train, train_config, progress=ctx.progress)
        train_wall = time.perf_counter() - start
        if result.status != "ok":
            raise FloatingPointError(result.reason)
        ctx.keep_model(flow, config)
        if len(forward.nfe) != result.iterations_done:
            raise RuntimeError(f"expected one forward solve per iteration, got {len(forward.nfe)} for "
                               f"{result.iterations_done} iterations")
        walls = [entry["wall_s"] for entry in result.history]
        steps = [b - a for a, b in zip([0.0, *walls[:-1]], walls)]  # per logged iteration when log_every = 1
        records = [ctx.record("n_parameters", flow.n_parameters, "count"),
                   ctx.record("train_wall_s", train_wall, "s"),
                   ctx.record("train_s_per_iteration", statistics.median(steps) / p["log_every"],
                              "s, median over the logged intervals"),
                   ctx.record("final_train_loss", result.history[-1]["loss"], "nats, training estimator")]
        total_unit = "function evaluations per training iteration (forward + adjoint)"
        forward_unit = "function evaluations per training iteration (forward solve)"
        totals, forwards = [], []
        for entry in result.history:
            it = int(entry["iteration"])
            totals.append(entry["nfe"])
            forwards.append(float(forward.nfe[it]))
            records.append(ctx.record("nfe_per_iteration", entry["nfe"], total_unit, step=it))
            records.append(ctx.record("nfe_forward_per_iteration", forward.nfe[it], forward_unit, step=it))
            records.append(ctx.record("train_loss", entry["loss"], "nats, training estimator", step=it))
        for name, series, unit in (("nfe", totals, total_unit), ("nfe_forward", forwards, forward_unit)):
            first, last, ratio = growth(series)
            records += [ctx.record(f"{name}_first", first, f"{unit}, mean over the first tenth"),
                        ctx.record(f"{name}_last", last, f"{unit}, mean over the last tenth"),
                        ctx.record(f"{name}_growth", ratio, "last tenth / first tenth")]

        # Test NLL: first with the solver of training, then with the shared reference solver.
        start = time.perf_counter()
        solver_name = _solver_label(flow)
        own = nll_records(ctx, flow, test, "nll_test_train_solver", detail=solver_name,
                          batch_size=p["eval_batch_size"])
        if p["eval_solver"] == "otd":
            flow.with_solver(mode="otd")
        else:
            flow.with_solver(mode="dto", steps=p["eval_steps"])
        reference_name = _solver_label(flow)
        if reference_name == solver_name:  # the same solve: the same numbers under the reference names
            reference = [dataclasses.replace(r, metric=r.metric.replace("nll_test_train_solver", "nll_test"))
                         for r in own]
        else:
            reference = nll_records(ctx, flow, test, "nll_test", detail=reference_name,
                                    batch_size=p["eval_batch_size"])
        records += [*own, *reference,
                    ctx.record("eval_nfe_per_solve", flow.last_solve_nfe, f"function evaluations, {reference_name}"),
                    ctx.record("eval_wall_s", time.perf_counter() - start, "s")]
        check_finite(records)
        return records

    # ------------------------------------------------------------------------------------ plot
    def plot(self, table: pandas.DataFrame, out_dir: Path) -> list[Path]:
        """(a) Function evaluations per iteration vs iteration, per model and solver: total solid,
        forward solve dashed, mean over seeds with a ±1 std band (Fig. 4b: DTO flat, OTD rising).
        (b) Test NLL per model and solver, each seed a dot, mean ± std (Fig. 4a; 3 runs in the
        paper, C.7; NLL, so lower is better where the paper plots the log-likelihood)."""
        import seaborn as sns

        from eqbench.plots import metric_rows, new_figure, save_figure

        written: list[Path] = []
        for system in sorted(table["system"].unique()):
            rows = table[table["system"] == system].copy()
            rows["variant"] = rows["variant"].fillna("").astype(str)
            fig, (ax_nfe, ax_nll) = new_figure(2, width=5.0, height=3.8)
            colours = iter(sns.color_palette("colorblind", 20))
            for model in sorted(rows["model"].unique()):
                for solver in SOLVERS:
                    sub = rows[(rows["model"] == model) & (rows["variant"] == solver)]
                    colour = next(colours)  # one colour per model and solver, total and forward alike
                    for metric, style in (("nfe_per_iteration", "-"), ("nfe_forward_per_iteration", "--")):
                        series = metric_rows(sub, metric)
                        if series.empty:
                            continue
                        stats = series.groupby(series["step"].astype(int))["value"].agg(["mean", "std"]).sort_index()
                        label = f"{model} {solver.upper()}" + (" (forward solve)" if "forward" in metric else "")
                        ax_nfe.plot(stats.index, stats["mean"], style, color=colour, label=label)
                        band = stats["std"].fillna(0.0)
                        ax_nfe.fill_between(stats.index, stats["mean"] - band, stats["mean"] + band,
                                            color=colour, alpha=0.2, linewidth=0)
            ax_nfe.set_xlabel("training iteration")
            ax_nfe.set_ylabel("function evaluations per iteration")
            ax_nfe.set_title(f"{system}: NFE during training (Fig. 4b)")
            ax_nfe.legend(fontsize=7)
            nll = metric_rows(rows, "nll_test")
            labels = []
            for k, ((model, solver), group) in enumerate(nll.groupby(["model", "variant"], sort=True)):
                values = group["value"].astype(float)
                ax_nll.plot([k] * len(values), values, "o", alpha=0.6)
                ax_nll.errorbar([k], [values.mean()], yerr=[values.std() if len(values) > 1 else 0.0],
                                fmt="_", markersize=20, capsize=6, color="black")
                labels.append(f"{model}\n{solver.upper()}")
            ax_nll.set_xticks(range(len(labels)), labels, fontsize=7)
            ax_nll.set_xlim(-0.5, max(1, len(labels)) - 0.5)
            if not nll.empty:  # at least 1 nat of range: differences of 1e-5 nats must not look large
                lo, hi = float(nll["value"].min()), float(nll["value"].max())
                if hi - lo < 1.0:
                    mid = 0.5 * (lo + hi)
                    ax_nll.set_ylim(mid - 0.5, mid + 0.5)
            ax_nll.ticklabel_format(axis="y", useOffset=False)
            unit = str(nll["unit"].iloc[0]) if not nll.empty else "nats"
            ax_nll.set_ylabel(f"test NLL ({unit})", fontsize=7)
            ax_nll.set_title(f"{system}: test NLL after training (Fig. 4a)")
            written += save_figure(fig, out_dir, f"dto-vs-otd_{system}")
        return written

    def report_section(self) -> TaskSection:
        """Test NLL and function evaluations per settings key and solver (Fig. 4)."""
        return TaskSection(
            task="dto-vs-otd",
            title="Discretise-then-optimise vs optimise-then-discretise",
            paper="§7.2, Fig. 4",
            conventions="Test NLL: −log q in nats per configuration on the CoM-free subspace, Gaussian constant "
                        "included, exact divergence; both solvers' models are integrated by the same reference "
                        "solver (nll_test) and by their training solver (nll_test_train_solver). "
                        "NFE = function evaluations per training iteration; growth = last tenth / first tenth of "
                        "training. Variant = training solver.",
            metrics=("nll_test", "nll_test_train_solver", "nfe_first", "nfe_last", "nfe_growth",
                     "train_s_per_iteration"),
            no_baseline="The paper reports these results only as figures (Fig. 4a, 4b); there are no published "
                        "numbers to place beside them.",
            order=5,
        )


def _solver_label(flow: CNF) -> str:
    """How a flow integrates, for record units: ``RK4 20 steps`` / ``dopri5 atol=1e-10 rtol=1e-05``."""
    s = flow.solver
    dtype = str(next(flow.parameters()).dtype).removeprefix("torch.")
    if s.mode == "dto":
        return f"RK4 {s.steps} steps, {dtype}"
    return f"dopri5 atol={s.atol:g} rtol={s.rtol:g}, {dtype}"


TASK = DtoVsOtd()
