"""Bad input is refused before any work: one line, exit code 2, nothing written (issue "Faults and
bad input", item 5), and an unreadable baselines file is a one-line warning, not a traceback
(item 7). Planning-level and CLI-level; nothing here trains a model.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pandas as pd
import pytest

import eqbench
from eqbench import report
from eqbench.capabilities import model_builder
from eqbench.cli import main
from eqbench.components import build_model, validate_model_config
from eqbench.errors import ConfigError, EqbenchError
from eqbench.flows.cnf import SolverConfig
from eqbench.planning import NoCellsError, plan_cells
from eqbench.sweep import plan_sweep

# -------------------------------------------------------------------------- plugins for the tests
PLUGINS = types.ModuleType("bad_input_plugins")


def _never_built(system, config):
    raise AssertionError("planning must not build a model")


def _check_width(system, config):
    if set(config) - {"width"}:
        raise ConfigError(f"unknown settings {sorted(set(config) - {'width'})}; valid: width")
    if "width" in config and not (isinstance(config["width"], int) and config["width"] > 0):
        raise ConfigError(f"width must be a positive integer; got {config['width']!r}")


def _broken_validator(system, config):
    raise RuntimeError("validator\nbug")


PLUGINS.checked = model_builder(capabilities=["trainable", "exact-density"], validate=_check_width)(_never_built)
PLUGINS.unchecked = model_builder(capabilities=["trainable", "exact-density"])(lambda s, c: _never_built(s, c))
PLUGINS.broken = model_builder(capabilities=["trainable", "exact-density"], validate=_broken_validator)(
    lambda s, c: _never_built(s, c))
sys.modules["bad_input_plugins"] = PLUGINS


# ------------------------------------------------------------------------------- model settings
MODEL_CONFIG_CASES = [
    # (model, model_config, what the one line must say)
    ("kernel-flow", {"foo": 1}, r"unknown kernel-flow settings: foo; valid: atol, bandwidths, dtype, .*steps"),
    ("node", {"dtype": "float16"}, r"node setting dtype must be one of float32, float64; got 'float16'"),
    ("node", {"init_scale": float("inf")}, r"node setting init_scale must be positive \(a finite number > 0\); got inf"),
    ("gradient-flow", {"init_scale": float("inf")}, r"init_scale must be positive \(a finite number > 0\); got inf"),
    ("kernel-flow", {"init_scale": float("nan")}, r"init_scale must be a finite number >= 0; got nan"),
    ("kernel-flow", {"rtol": 0}, r"kernel-flow setting rtol must be positive \(a finite number > 0\); got 0"),
    ("node", {"atol": -1e-8}, r"atol must be positive"),
    ("kernel-flow", {"steps": "abc"}, r"steps must be a positive integer; got 'abc'"),
    ("kernel-flow", {"steps": 2.7}, r"steps must be a positive integer; got 2.7"),
    ("node", {"steps": 20.0}, r"steps must be a positive integer; got 20.0"),
    ("kernel-flow", {"n_distance_kernels": 1}, r"n_distance_kernels must be an integer >= 2 \(at least 2 distance"),
    ("node", {"hidden": [64.0, 64]}, r"hidden must be a non-empty list of positive integer widths"),
    ("node", {"eval_divergence": "hutchinson"}, r"eval_divergence must be exact"),
    ("node", {"train_divergence": "closed-form"}, r"train_divergence must be one of exact, brute-force, hutchinson"),
    ("real-nvp", {"blocks": 2.5}, r"real-nvp setting blocks must be a positive integer"),
    ("real-nvp", {"log_scale_bound": float("inf")}, r"log_scale_bound must be a finite number >= 0"),
    ("gaussian", {"scale": 0}, r"gaussian setting scale must be positive \(a finite number > 0\)"),
    ("gaussian", {"dtype": "float64"}, r"unknown gaussian settings: dtype; valid: scale"),
]


@pytest.mark.parametrize(("model", "config", "message"), MODEL_CONFIG_CASES)
def test_bad_model_settings_are_refused_at_planning(model, config, message):
    with pytest.raises(ConfigError, match=message) as info:
        plan_cells("test-nll", model, "dw4", "smoke", overrides={"model_config": config})
    assert str(info.value).startswith(f"model {model!r} on dw4: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(("model", "config", "message"), MODEL_CONFIG_CASES)
def test_the_builder_applies_the_same_check(model, config, message):
    """What planning refuses, building refuses too: no setting is truncated or coerced anywhere."""
    with pytest.raises(ConfigError, match=message):
        build_model(model, "dw4", config)


def test_valid_settings_plan_and_build_unchanged():
    config = {"steps": 4, "rtol": 1e-4, "atol": 1e-8, "solver": "otd", "dtype": "float64", "init_scale": 0.01}
    (plan,) = plan_cells("test-nll", "kernel-flow", "dw4", "smoke", overrides={"model_config": config})
    assert plan.params["model_config"] == config
    flow = build_model("kernel-flow", "dw4", config)
    assert (flow.solver.steps, flow.solver.rtol, flow.solver.mode) == (4, 1e-4, "otd")
    assert validate_model_config("real-nvp", "dw4", {"log_scale_bound": "none", "hidden": [8, 8]}) is True


def test_solver_settings_are_never_truncated():
    with pytest.raises(ConfigError, match="steps must be a positive integer, got 2.7"):
        SolverConfig(steps=2.7)
    with pytest.raises(ConfigError, match="rtol must be a finite number > 0"):
        SolverConfig(rtol=0.0)
    flow = build_model("kernel-flow", "dw4", {"steps": 4})
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        flow.with_solver(steps=2.7)


def test_model_config_must_be_a_table():
    with pytest.raises(ConfigError, match="model_config must be a table"):
        plan_cells("test-nll", "kernel-flow", "dw4", "smoke", overrides={"model_config": "otd"})


def test_a_declared_validator_runs_at_planning_and_nothing_is_built():
    with pytest.raises(ConfigError, match=r"model 'bad_input_plugins:checked' on dw4: width must be a positive"):
        plan_cells("test-nll", "bad_input_plugins:checked", "dw4", "smoke", overrides={"model_config": {"width": 0}})
    plans = plan_cells("test-nll", "bad_input_plugins:checked", "dw4", "smoke", overrides={"model_config": {"width": 3}})
    assert plans  # validated, and the builder (which would raise) never ran


def test_a_plugin_without_a_validator_is_left_to_the_preflight():
    """Its code never runs in the planning process: its settings are judged when it is built."""
    assert validate_model_config("bad_input_plugins:unchecked", "dw4", {"anything": 1}) is False
    assert plan_cells("test-nll", "bad_input_plugins:unchecked", "dw4", "smoke",
                      overrides={"model_config": {"anything": 1}})


def test_a_failing_validator_is_one_line():
    with pytest.raises(EqbenchError, match="settings validator failed on dw4: RuntimeError: validator bug") as info:
        plan_cells("test-nll", "bad_input_plugins:broken", "dw4", "smoke")
    assert "\n" not in str(info.value)


def test_model_builder_refuses_a_validator_that_is_not_a_function():
    with pytest.raises(ConfigError, match="validate= must be a function"):
        model_builder(capabilities=["trainable"], validate="yes")


# ------------------------------------------------------------------------- sample counts, grids
@pytest.mark.parametrize(("task", "model", "overrides", "message"), [
    ("test-nll", "gaussian", {"n_train": [20000]}, r"n_train = 20000 is more than the dw4 train split holds "
                                                   r"\(10000 configurations\); valid: 1 to 10000"),
    ("test-nll", "gaussian", {"n_test": 10001}, r"n_test = 10001 is more than the dw4 test split holds"),
    ("density-estimation", "node", {"n_val": 5000}, r"n_val = 5000 is more than the dw4 val split holds \(2000"),
    ("bg-reweighting", "node", {"n_train": 10**6}, r"n_train = 1000000 is more than the dw4 train split"),
    ("dto-vs-otd", "kernel-flow", {"n_test": 20000}, r"n_test = 20000 is more than the dw4 test split"),
    ("evaluate", "gaussian", {"n_reference": 20000}, r"n_reference = 20000 is more than the dw4 test split"),
    ("timing", "node", {"n_data": 20000}, r"n_data = 20000 is more than the dw4 train split"),
])
def test_sample_counts_larger_than_the_split_are_refused(task, model, overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells(task, model, "dw4", "smoke", overrides=overrides)


def test_sample_counts_up_to_the_split_plan():
    assert plan_cells("test-nll", "gaussian", "dw4", "smoke", overrides={"n_train": [10000], "n_test": 10000})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"seeds": []}, r"seeds is an empty list, so no cell would run"),
    ({"n_train": []}, r"n_train is an empty list, so no cell would run"),
    ({"augment": []}, r"augment is an empty list, so no cell would run"),
])
def test_an_empty_grid_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_cells("density-estimation", "node", "dw4", "smoke", overrides=overrides)


@pytest.mark.parametrize("task", ["density-estimation", "bg-reweighting"])
def test_augmenting_only_an_equivariant_model_is_refused_with_the_reason(task):
    with pytest.raises(NoCellsError, match=r"no cells to run: augment = true only, and model 'kernel-flow' is "
                                           r"equivariant.*--set augment=\[false\]"):
        plan_cells(task, "kernel-flow", "dw4", "smoke", overrides={"augment": [True]})
    assert plan_cells(task, "node", "dw4", "smoke", overrides={"augment": [True]})


def test_sweep_runs_the_models_with_cells_and_lists_the_others(tmp_path):
    plan = plan_sweep("density-estimation", ["kernel-flow", "node"], ["dw4"], "smoke",
                      overrides={"augment": [True]}, results_dir=tmp_path)
    assert {c.model for c in plan.todo} == {"node"}
    ((model, system, reason),) = plan.unsupported
    assert (model, system) == ("kernel-flow", "dw4") and "equivariant" in reason
    with pytest.raises(NoCellsError, match="augment = true only.*and 1 more model/system pairs"):
        plan_sweep("density-estimation", ["kernel-flow", "gradient-flow"], ["dw4"], "smoke",
                   overrides={"augment": [True]}, results_dir=tmp_path)
    with pytest.raises(ConfigError, match="model 'gaussian' on dw4: unknown gaussian settings: steps"):
        plan_sweep("test-nll", ["kernel-flow", "gaussian"], ["dw4"], "smoke",
                   overrides={"model_config": {"steps": 4}}, results_dir=tmp_path)


def test_evaluate_refuses_counts_and_empty_seeds_before_anything_is_written(tmp_path):
    flow = build_model("gaussian", "dw2")
    with pytest.raises(ConfigError, match="n_test = 20000 is more than the dw2 test split"):
        eqbench.evaluate(flow, "dw2", name="g", overrides={"n_test": 20000}, results_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="seeds is an empty list"):
        eqbench.evaluate(flow, "dw2", name="g", overrides={"seeds": []}, results_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "cells").exists()


# ---------------------------------------------------------------------------------------- CLI
def _written(results: Path) -> list[Path]:
    return [p for p in results.rglob("*") if p.is_file()] if results.exists() else []


CLI_CASES = [
    ("test-nll", "kernel-flow", "model_config={foo=1}", "unknown kernel-flow settings: foo; valid:"),
    ("test-nll", "node", 'model_config={dtype="float16"}', "dtype must be one of float32, float64"),
    ("test-nll", "node", "model_config={init_scale=inf}", "init_scale must be positive (a finite number > 0); got inf"),
    ("test-nll", "kernel-flow", "model_config={rtol=0}", "rtol must be positive (a finite number > 0); got 0"),
    ("test-nll", "kernel-flow", 'model_config={steps="abc"}', "steps must be a positive integer; got 'abc'"),
    ("test-nll", "kernel-flow", "model_config={steps=2.7}", "steps must be a positive integer; got 2.7"),
    ("test-nll", "gaussian", "n_train=[20000]", "n_train = 20000 is more than the dw4 train split holds"),
    ("test-nll", "gaussian", "seeds=[]", "seeds is an empty list"),
    ("test-nll", "gaussian", "n_train=[]", "n_train is an empty list"),
    ("density-estimation", "kernel-flow", "augment=[true]", "no cells to run: augment = true only"),
    ("test-nll", "gaussian", "lr=inf", "lr must be a finite number"),
]


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize(("task", "model", "setting", "message"), CLI_CASES)
def test_cli_refuses_in_one_line_with_exit_2_and_writes_nothing(command, task, model, setting, message, tmp_path,
                                                                capsys):
    results = tmp_path / "results"
    code = main([command, "--task", task, "--model", model, "--system", "dw4", "--set", setting,
                 "--results", str(results), "--no-plot"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("eqbench: error: ") and err.strip().count("\n") == 0 and message in err, err
    assert not _written(results) and not (results / "cells").exists()


def test_cli_sweep_lists_the_models_without_cells(tmp_path, capsys):
    code = main(["sweep", "--task", "density-estimation", "--model", "kernel-flow", "node", "--system", "dw4",
                 "--set", "augment=[true]", "--results", str(tmp_path / "r"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped kernel-flow on dw4: no cells to run: augment = true only" in out
    assert "node" in out and not _written(tmp_path / "r")


# ----------------------------------------------------------------------------- baselines file
BAD_BASELINES = {
    "empty": ("", "are empty"),
    "header only": (",".join(report.BASELINE_COLUMNS) + "\n", "hold no rows"),
    "not a number": (",".join(report.BASELINE_COLUMNS) + "\nk,T1,dw4,m,nll,abc,,nats,c,n\n", "cannot be read"),
    "ragged": (",".join(report.BASELINE_COLUMNS) + '\nk,T1,dw4,m,nll,1,,nats,c,n,extra,more\n"unclosed\n',
               "cannot be read"),
    "missing column": ("source,table,system,model,metric\nk,T1,dw4,m,nll\n", "lack the columns value, error"),
    "not text": (b"\xff\xfe\x00\x01garbage\x00", "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(BAD_BASELINES))
def test_unreadable_baselines_warn_once_and_report_measured_numbers(case, tmp_path):
    content, message = BAD_BASELINES[case]
    path = tmp_path / "published.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.warns(report.BaselinesWarning, match=message) as caught:
        table = report.load_baselines(path)
    assert table.empty and list(table.columns) == list(report.BASELINE_COLUMNS)
    assert message in table.attrs["problem"]
    assert all("\n" not in str(w.message) for w in caught)


def _empty_results(root: Path) -> Path:
    from eqbench.records import RECORD_COLUMNS

    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns=list(RECORD_COLUMNS)).to_csv(root / "results.csv", index=False)
    return root


def test_report_page_says_published_numbers_are_unavailable(tmp_path):
    bad = tmp_path / "published.csv"
    bad.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", report.BaselinesWarning)
        html = report.render_report(_empty_results(tmp_path / "r"), baselines=report.load_baselines(bad))
    assert "Published numbers unavailable" in html and "are empty" in html
    assert "Published numbers unavailable" not in report.render_report(tmp_path / "r")  # the shipped file reads


def test_cli_report_with_a_malformed_baselines_file_is_one_warning_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "published.csv"
    bad.write_text(",".join(report.BASELINE_COLUMNS) + "\nk,T1,dw4,m,nll,abc,,nats,c,n\n")
    monkeypatch.setattr(report, "baselines_path", lambda: bad)
    results = _empty_results(tmp_path / "r")
    code = main(["report", "--results", str(results), "--out", str(tmp_path / "report.html")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("eqbench: warning: the published baselines "), captured.err
    assert "Traceback" not in captured.err
    assert "Published numbers unavailable" in (tmp_path / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", ["run", "sweep", "evaluate"])
@pytest.mark.parametrize(("flag", "message"), [(["--threads", "-3"], "--threads must be >= 0"),
                                                (["--seed", "1", "--seeds", "2"], "not both"),
                                                (["--seeds", "0"], "--seeds must be a positive count"),
                                                (["--seed", "-1"], "--seed must be a non-negative integer")])
def test_cli_flags_shared_by_the_cell_commands_are_checked_alike(command, flag, message, tmp_path, capsys):
    results = tmp_path / "results"
    target = ["--model", "gaussian", "--system", "dw4"] + ([] if command == "evaluate" else ["--task", "test-nll"])
    code = main([command, *target, *flag, "--results", str(results), "--no-plot"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and message in err, err
    assert not (results / "cells").exists()
