"""Bring your own flow, end to end: the zuko example trained through `run` with its own learning
rate and schedule, evaluated from its kept checkpoint through `evaluate`, and shown in the report
beside the kernel flow (the README's walk-through; CI repeats it from a wheel install)."""

from __future__ import annotations

from pathlib import Path

import pytest

import eqbench
from eqbench.artifacts import MODEL_FILE
from eqbench.records import CellStore

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "zuko_spline"
MODEL = "eqbench_zuko_example:build"


@pytest.fixture
def example(monkeypatch):
    pytest.importorskip("zuko")
    monkeypatch.syspath_prepend(str(EXAMPLE))


def test_own_flow_trained_with_its_settings_evaluated_from_checkpoint_and_reported(example, tmp_path, monkeypatch):
    import eqbench.train

    seen = []
    real_fit = eqbench.train.fit

    def spy(flow, system, data, config, **kwargs):
        seen.append((type(flow).__name__, config.lr, config.schedule, config.lr_warmup))
        return real_fit(flow, system, data, config, **kwargs)

    monkeypatch.setattr(eqbench.train, "fit", spy)
    settings = {"lr": {"default": 5e-3, MODEL: 1e-3}, "schedule": {"default": "constant", MODEL: "cosine"},
                "lr_warmup": {"default": 0, MODEL: 2}, "augment": [False]}
    ours = eqbench.run("density-estimation", MODEL, "dw4", "smoke", overrides=settings, results_dir=tmp_path)
    theirs = eqbench.run("density-estimation", "kernel-flow", "dw4", "smoke", overrides=settings, results_dir=tmp_path)
    assert all(c.status == "ok" for c in ours + theirs), [c.reason for c in ours + theirs]
    assert ("FlatFlow", 1e-3, "cosine", 2) in seen and ("KernelFlow", 5e-3, "constant", 0) in seen
    assert ours[0].config["params"]["lr"] == 1e-3 and theirs[0].config["params"]["lr"] == 5e-3

    checkpoint = tmp_path / ours[0].artifacts[MODEL_FILE]["path"]
    seen.clear()
    (scored,) = eqbench.evaluate(MODEL, "dw4", checkpoint=checkpoint, results_dir=tmp_path)
    assert scored.status == "ok", scored.reason
    assert seen == []  # scored as trained: no optimiser step
    trained_test = {r.metric: r.value for r in ours[0].records if r.step is None}["nll_test"]
    evaluated_test = {r.metric: r.value for r in scored.records if r.step is None}["nll_test"]
    # Same weights, same NLL definition; evaluate's smoke test subset is a prefix-nested subset of
    # a different size, so the means agree only roughly, but a freshly built (untrained) flow's
    # NLL would be far off.
    untrained = eqbench.evaluate(MODEL, "dw4", results_dir=tmp_path / "untrained")[0]
    untrained_test = {r.metric: r.value for r in untrained.records if r.step is None}["nll_test"]
    assert abs(evaluated_test - trained_test) < abs(untrained_test - trained_test)

    from eqbench.report import write_report

    table = CellStore(tmp_path).collect()
    assert {"density-estimation", "evaluate"} <= set(table["task"])
    html = Path(write_report(tmp_path)).read_text()
    assert "Evaluated flows" in html and "kernel-flow" in html and "eqbench_zuko_example" in html
