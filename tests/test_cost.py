"""Pricing sweep cells (issue 6): phase scaling, the tasks' budget replays, packing, the CLI."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

import eqbench
from eqbench.cost import CostModel, check_prices, phase_estimate, wall_seconds
from eqbench.records import CellResult, Record
from eqbench.registry import TASKS
from eqbench.runner import CellPlan, plan_cells

DE_PARAMS = {"n_train": 10, "augment": False, "variant": "", "n_test": 100, "n_train_eval": 10, "n_val": 20,
             "validate_every": 50, "model_selection": "best-validation", "iterations": 100, "batch_size": 64,
             "model_config": {}}
FIT_S_PER_STEP, EVAL_S_PER_CONFIG, VALIDATION_S_PER_CONFIG, SETUP_S = 1e-3, 2e-3, 3e-3, 1.0


def checkpoints(params: dict) -> int:
    """Validation scorings of a density-estimation cell: before training, every validate_every, after."""
    return 1 + math.ceil(params["iterations"] / params["validate_every"])


def cell(task: str, model: str, system: str, params: dict, seed: int = 0, *, profile: str = "quick",
         records: dict[str, float] | list[Record] = (), duration: float | None = None, device: str = "cpu",
         cell_id: str | None = None) -> CellResult:
    """A finished cell as the store would hold it, with the given wall-time records."""
    if isinstance(records, dict):
        records = [Record(task, system, model, metric, value) for metric, value in records.items()]
    accounted = sum(r.value for r in records if r.metric.endswith("_wall_s"))
    config = {"task": task, "model": model, "system": system, "profile": profile, "seed": seed, "params": params}
    return CellResult(task=task, cell_id=cell_id or f"{task}-{model}-{system}-{seed}-{len(str(params))}-{profile}",
                      config=config, status="ok", duration_s=accounted + SETUP_S if duration is None else duration,
                      provenance={"device": device}, records=list(records))


def de_cell(iterations: int, seed: int = 0, *, variant: str = "", rate: float = FIT_S_PER_STEP, **kw) -> CellResult:
    params = dict(DE_PARAMS, iterations=iterations, variant=variant, augment=bool(variant))
    steps = iterations * params["batch_size"]
    configs = params["n_train"] + params["n_val"] + params["n_test"]
    validation = params["n_val"] * checkpoints(params) * VALIDATION_S_PER_CONFIG
    return cell("density-estimation", "kernel-flow", "dw4", params, seed, cell_id=f"de-{iterations}-{seed}-{variant}",
                records={"fit_wall_s": steps * rate, "eval_wall_s": configs * EVAL_S_PER_CONFIG,
                         "validation_wall_s": validation}, **kw)


def plan_of(task: str, model: str, system: str, params: dict, seed: int = 0, profile: str = "paper") -> CellPlan:
    return CellPlan(task, model, system, profile, seed, params)


def test_phases_scale_linearly_from_cells_of_another_profile():
    calibration = [de_cell(100, profile="smoke"), de_cell(400)]
    paper = dict(DE_PARAMS, iterations=5000, n_train=1000, n_train_eval=1000, n_test=10000)
    expected = (5000 * 64 * FIT_S_PER_STEP + (1000 + 20 + 10000) * EVAL_S_PER_CONFIG
                + 20 * checkpoints(paper) * VALIDATION_S_PER_CONFIG + SETUP_S)
    task = TASKS.get("density-estimation")
    assert phase_estimate(task, paper, "dw4", calibration) == pytest.approx(expected)
    estimate = CostModel(calibration).estimate(plan_of("density-estimation", "kernel-flow", "dw4", paper))
    assert estimate.seconds == pytest.approx(expected)
    assert estimate.basis == "scaled from 2 quick/smoke cell(s)"


def test_cells_from_before_the_sample_metrics_still_price_the_other_phases():
    """Older cells drew no metric samples (work 0 there): they price training and scoring, and a
    plan that samples stays unpriced until a cell has measured sampling."""
    task = TASKS.get("density-estimation")
    old = [de_cell(100, profile="smoke"), de_cell(400)]
    new_params = dict(DE_PARAMS, iterations=5000, n_metric_samples=200, coord_w2_aligned_samples=20)
    assert task.cost_phases(DE_PARAMS, "dw4")["sample_wall_s"] == 0
    assert phase_estimate(task, dict(DE_PARAMS, iterations=5000), "dw4", old) is not None
    assert phase_estimate(task, new_params, "dw4", old) is None
    sampled = cell("density-estimation", "kernel-flow", "dw4", dict(DE_PARAMS, n_metric_samples=100,
                                                                   coord_w2_aligned_samples=10),
                   cell_id="de-sampled", records={"fit_wall_s": 100 * 64 * FIT_S_PER_STEP,
                                                 "eval_wall_s": 130 * EVAL_S_PER_CONFIG,
                                                 "validation_wall_s": 20 * 3 * VALIDATION_S_PER_CONFIG,
                                                 "sample_wall_s": 0.5, "sample_metrics_wall_s": 0.1})
    price = phase_estimate(task, new_params, "dw4", [*old, sampled])
    without_sampling = phase_estimate(task, dict(DE_PARAMS, iterations=5000), "dw4", [*old, sampled])
    assert price == pytest.approx(without_sampling + 200 * 0.5 / 100 + 400 * 0.1 / 100, rel=0.05)


def test_a_phase_never_measured_leaves_the_cell_unpriced():
    calibration = de_cell(100)
    calibration.records = [r for r in calibration.records if r.metric != "eval_wall_s"]
    task = TASKS.get("density-estimation")
    assert phase_estimate(task, dict(DE_PARAMS, iterations=5000), "dw4", [calibration]) is None
    estimate = CostModel([calibration]).estimate(plan_of("density-estimation", "kernel-flow", "dw4",
                                                          dict(DE_PARAMS, iterations=5000)))
    assert estimate.seconds is None and "cannot scale" in estimate.basis


def test_same_settings_are_priced_by_their_own_durations_and_nothing_is_guessed():
    finished = [de_cell(100, seed=s, duration=d) for s, d in ((0, 10.0), (1, 30.0), (2, 14.0))]
    model = CostModel(finished)
    same = model.estimate(plan_of("density-estimation", "kernel-flow", "dw4", dict(DE_PARAMS), seed=7))
    assert same.seconds == 14.0 and same.basis.startswith("measured: 3 cell(s)")
    other_pair = model.estimate(plan_of("density-estimation", "node", "dw4", dict(DE_PARAMS)))
    assert other_pair.seconds is None and "no finished density-estimation cell of node on dw4" in other_pair.basis


def test_calibration_needs_the_same_variant_and_the_same_kind_of_device():
    plain, aug = de_cell(100, rate=1e-3), de_cell(100, variant="aug", rate=5e-3)
    model = CostModel([plain, aug])
    target = dict(DE_PARAMS, iterations=1000, variant="aug", augment=True)
    fit_aug = 1000 * 64 * 5e-3
    assert model.estimate(plan_of("density-estimation", "kernel-flow", "dw4", target)).seconds == pytest.approx(
        fit_aug + 130 * EVAL_S_PER_CONFIG + 20 * checkpoints(target) * VALIDATION_S_PER_CONFIG + SETUP_S)
    other_variant = CostModel([plain]).estimate(plan_of("density-estimation", "kernel-flow", "dw4", target))
    assert other_variant.seconds is None and "variant 'aug'" in other_variant.basis
    gpu_only = CostModel([de_cell(100, device="cuda:0")], device="cpu")
    assert len(gpu_only) == 0
    assert CostModel([de_cell(100, device="cuda:1")], device="cuda").estimate(
        plan_of("density-estimation", "kernel-flow", "dw4", dict(DE_PARAMS, iterations=200))).seconds is not None


def test_failed_cells_do_not_calibrate():
    bad = de_cell(100)
    bad.status = "failed"
    assert len(CostModel([bad])) == 0


DC_PARAMS = {"particle_counts": [2, 4], "methods": ["velocity"], "batch_size": 16, "repeats": 10, "min_repeats": 2,
             "budget_s": 100.0, "error_configs": 0, "error_probes": 10, "fit_points": 2, "time": 0.5,
             "model_config": {}}


def dc_calibration() -> CellResult:
    records = []
    for n, seconds in ((2, 0.1), (4, 0.2)):
        records += [Record("divergence-cost", "dw4", "kernel-flow", "eval_time_s", seconds, variant="velocity", step=n),
                    Record("divergence-cost", "dw4", "kernel-flow", "eval_repeats", 10, variant="velocity", step=n)]
    timed = 11 * 0.1 + 11 * 0.2
    return cell("divergence-cost", "kernel-flow", "dw4", dict(DC_PARAMS), records=records, duration=timed + 5.0)


@pytest.mark.parametrize("change, expected", [
    ({}, 11 * 0.1 + 11 * 0.2 + 5.0),                               # as measured
    ({"batch_size": 32}, 11 * 0.2 + 11 * 0.4 + 5.0),               # calls scale with the batch
    ({"batch_size": 32, "budget_s": 2.0}, 10 * 0.2 + 5.0),         # 9 repeats fit at N=2; N=4 (1.6 s x 3) skipped
    ({"batch_size": 32, "particle_counts": [2, 4, 8]}, 11 * 0.2 + 11 * 0.4 + 11 * 0.8 + 5.0),  # N=8 extrapolated
])
def test_divergence_cost_replays_its_budget_rules(change, expected):
    task = TASKS.get("divergence-cost")
    params = dict(DC_PARAMS, **change)
    assert task.estimate_seconds(params, "kernel-flow", "dw4", [dc_calibration()]) == pytest.approx(expected)


def test_divergence_cost_needs_a_measured_error_study_to_price_one():
    task = TASKS.get("divergence-cost")
    assert task.estimate_seconds(dict(DC_PARAMS, error_configs=4), "kernel-flow", "dw4", [dc_calibration()]) is None
    calibration = dc_calibration()
    calibration.config["params"]["error_configs"] = 2
    calibration.records += [Record("divergence-cost", "dw4", "kernel-flow", "hutchinson_study_wall_s", s,
                                   variant="hutchinson", step=n) for n, s in ((2, 0.5), (4, 1.0))]
    calibration.duration_s += 1.5
    expected = 11 * 0.1 + 11 * 0.2 + 5.0 + 2 * (0.5 + 1.0)  # twice the configurations
    assert task.estimate_seconds(dict(DC_PARAMS, error_configs=4), "kernel-flow", "dw4",
                                 [calibration]) == pytest.approx(expected)


TIMING_PARAMS = {"batch_size": 64, "n_data": 1000, "train_epochs": 5, "train_iterations": 5, "sample_epochs": 3,
                 "sample_iterations": 2, "warmup": 1, "budget_s": 120.0, "reference_model": "kernel-flow",
                 "model_config": {}}


def timing_calibration() -> CellResult:
    values = {"train_iteration_s": 0.5, "train_timed_iterations": 25, "reference_train_iteration_s": 0.1,
              "reference_train_timed_iterations": 25, "sample_iteration_s": 2.0, "sample_timed_iterations": 6,
              "reference_sample_iteration_s": 0.05, "reference_sample_timed_iterations": 6}
    timed = 26 * 0.5 + 26 * 0.1 + 7 * 2.0 + 7 * 0.05
    return cell("timing", "gradient-flow", "dw4", dict(TIMING_PARAMS), records=values, duration=timed + 3.0)


def test_timing_replays_its_budget_plan():
    task = TASKS.get("timing")
    paper = dict(TIMING_PARAMS, train_epochs=10, train_iterations=10, sample_epochs=10, sample_iterations=10,
                 warmup=2, budget_s=3600.0)
    full = 102 * 0.5 + 102 * 0.1 + 102 * 2.0 + 102 * 0.05 + 3.0
    assert task.estimate_seconds(paper, "gradient-flow", "dw4", [timing_calibration()]) == pytest.approx(full)
    # a 10 s budget: training keeps 10 epochs, the model's cut to 2 iterations (0.5 s each); sampling
    # at 2 s per iteration keeps 5 epochs of 1 iteration, and the reference follows those 5 epochs
    tight = dict(paper, budget_s=10.0)
    expected = (2 + 10 * 2) * 0.5 + (2 + 10 * 10) * 0.1 + (2 + 5 * 1) * 2.0 + (2 + 5 * 10) * 0.05 + 3.0
    assert task.estimate_seconds(tight, "gradient-flow", "dw4", [timing_calibration()]) == pytest.approx(expected)


def test_metastable_phases_resolve_the_protocol_per_method():
    from eqbench.api import get_system

    task = TASKS.get("metastable-states")
    params = dict(task.profile("paper"), variant="mcmc-long", sampling_protocol="eqbench")
    protocol = get_system("dw4").data_protocol
    per_chain = math.ceil(100_000 / protocol.n_chains)
    phases = task.cost_phases(params, "dw4")
    assert phases["mcmc_wall_s"] == 10 * protocol.n_chains * (protocol.burn_in + per_chain * protocol.stride)
    assert phases["minimize_wall_s"] == 10 * 100_000
    flow = task.cost_phases(dict(params, variant="flow"), "dw4")
    assert flow["train_wall_s"] == 64 * (3000 + 2 * 3000) and flow["sample_wall_s"] == 10 * 10_000
    assert set(task.cost_phases(dict(params, variant="training"), "lj13")) == {"training_set_wall_s"}
    # The paper sampling protocol: single trajectories, priced per Metropolis step of the one chain
    # (the training trajectory, then each round's: 65,000 burn-in steps before each).
    paper = task.cost_phases(dict(params, sampling_protocol="paper"), "lj13")
    assert paper == {"training_set_wall_s": 1000, "trajectory_wall_s": 66_000 + 10 * (65_000 + 100_000),
                     "minimize_wall_s": 10 * 100_000}


def test_shared_reference_cells_are_priced_from_reference_cells_of_any_model():
    """metastable-states' reference cells are shared by every model (model "reference", the
    reference settings only): a finished reference cell prices them, and so does one that an
    earlier version ran under a model's name with all the settings (older calibration runs)."""
    from eqbench.tasks.base import REFERENCE_MODEL

    task = TASKS.get("metastable-states")
    def long_mcmc(profile: str) -> CellPlan:
        return next(p for p in plan_cells("metastable-states", "node", "dw4", profile)
                    if p.params["variant"] == "mcmc-long")

    paper, quick = long_mcmc("paper"), long_mcmc("quick")
    assert paper.model == quick.model == REFERENCE_MODEL
    legacy_params = {k: v for k, v in task.profile("quick").items() if k != "seeds"} | {
        "variant": "mcmc-long", "sampling_protocol": "eqbench"}  # a cell holds one protocol (expand_cell)
    records = {"training_set_wall_s": 2.0, "mcmc_wall_s": 30.0, "minimize_wall_s": 10.0}
    shared = cell("metastable-states", REFERENCE_MODEL, "dw4", dict(quick.params), records=records)
    legacy = cell("metastable-states", "kernel-flow", "dw4", legacy_params, records=records)
    for finished in (shared, legacy):
        costs = CostModel([finished])
        estimate = costs.estimate(paper)
        assert estimate.seconds is not None and estimate.seconds > 42.0, estimate
        assert estimate.basis == "scaled from 1 quick cell(s)"
        assert costs.estimate(quick).basis == "measured: 1 cell(s) with these settings"
    flow = next(p for p in plan_cells("metastable-states", "node", "dw4", "paper") if p.params["variant"] == "flow")
    assert CostModel([legacy]).estimate(flow).seconds is None  # a reference prices no flow


def test_every_task_prices_its_paper_profile_from_its_own_smoke_phases():
    """Each built-in task names phases (or its own rule) for every paper cell: no task is left
    to the exact-match fallback."""
    for name in ("density-estimation", "test-nll", "bg-reweighting", "dto-vs-otd", "metastable-states"):
        task = TASKS.get(name)
        for plan in plan_cells(name, "kernel-flow", task.systems[0] if task.systems else "dw4", "paper"):
            phases = task.cost_phases(plan.params, plan.system)
            assert phases and all(w >= 0 for w in phases.values()), (name, phases)


def test_wall_time_packs_cells_onto_the_worker_that_frees_first():
    assert wall_seconds([3, 3, 2, 2, 2], jobs=2) == 7
    assert wall_seconds([3, 3, 2, 2, 2], jobs=1) == 12
    assert wall_seconds([5, 1], jobs=8) == 5
    assert wall_seconds([], jobs=2) == 0


def test_dry_run_and_price_check_from_measured_cells(tmp_path):
    results = tmp_path / "res"
    eqbench.run("test-nll", "kernel-flow", "dw4", "smoke", overrides={"iterations": 3, "n_test": 50},
                results_dir=results, progress=False)
    eqbench.run("test-nll", "kernel-flow", "dw4", "smoke", seed=1, overrides={"iterations": 3, "n_test": 50},
                results_dir=results, progress=False)
    base = [sys.executable, "-m", "eqbench"]
    dry = subprocess.run(base + ["sweep", "--task", "test-nll", "--model", "kernel-flow", "gaussian", "--system", "dw4",
                                 "--set", "iterations=30", "--set", "n_test=50", "--seeds", "3", "--jobs", "2",
                                 "--results", str(tmp_path / "new"), "--calibrate", str(results), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert out.count("scaled from 2 smoke cell(s)") == 3
    assert out.count("no finished test-nll cell of gaussian on dw4") == 3
    assert "6 cells to run, 0 already finished" in out and "3 cells unpriced" in out and "--jobs 2" in out
    assert not (tmp_path / "new").exists()  # a dry run writes nothing
    check = subprocess.run(base + ["price-check", "--results", str(results), "--calibrate", str(results)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert check.stdout.count("measured: 1 cell(s) with these settings") == 2  # each seed priced by the other
    assert "2 of 2 cells priced" in check.stdout
    checks = check_prices(results, [results])
    assert all(c.ratio is not None and c.ratio > 0 for c in checks)


# Settings a calibrate profile may shrink: counts of work units, repeat budgets and seeds. Every
# other setting (batch sizes, solvers, particle counts, chains, thresholds) sets the cost of one
# unit and must be the paper's, or calibrate cells would price paper cells wrongly.
CALIBRATE_MAY_CHANGE = {
    "density-estimation": {"n_train", "n_test", "n_train_eval", "n_val", "validate_every", "iterations", "seeds",
                           "n_metric_samples", "coord_w2_samples", "coord_w2_aligned_samples"},
    "bg-reweighting": {"n_train", "pretrain_iterations", "mix_iterations", "n_samples", "n_test", "seeds",
                       "coord_w2_samples", "coord_w2_aligned_samples"},
    "metastable-states": {"rounds", "n_train", "n_samples", "ml_iterations", "mix_iterations", "mcmc_short_samples",
                          "mcmc_long_samples", "mcmc_burn_in", "mcmc_stride", "seeds"},
    "divergence-cost": {"repeats", "min_repeats", "budget_s", "error_configs", "seeds"},
    "dto-vs-otd": {"n_test", "iterations", "seeds"},
    "timing": {"train_epochs", "train_iterations", "sample_epochs", "sample_iterations", "warmup", "budget_s", "seeds"},
}


@pytest.mark.parametrize("task", sorted(CALIBRATE_MAY_CHANGE))
def test_calibrate_profiles_keep_the_papers_cost_per_unit(task):
    profiles = TASKS.get(task).profiles()
    paper, calibrate = profiles["paper"], profiles["calibrate"]
    changed = {key for key in paper.keys() | calibrate.keys() if paper.get(key) != calibrate.get(key)}
    assert changed <= CALIBRATE_MAY_CHANGE[task], sorted(changed - CALIBRATE_MAY_CHANGE[task])
    assert changed, "a calibrate profile equal to the paper profile saves nothing"


def test_a_sweep_announces_its_price_before_running(tmp_path):
    for seed in (0, 1):
        eqbench.run("test-nll", "kernel-flow", "dw4", "smoke", seed=seed, overrides={"iterations": 3, "n_test": 50},
                    results_dir=tmp_path, progress=False)
    done = subprocess.run([sys.executable, "-m", "eqbench", "sweep", "--task", "test-nll", "--model", "kernel-flow",
                           "--system", "dw4", "--set", "iterations=3", "--set", "n_test=50", "--seeds", "3",
                           "--results", str(tmp_path), "--no-plot"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 cells to run, 2 already finished; estimated 0:00:" in done.stderr
