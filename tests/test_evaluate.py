"""Artifacts and evaluation without training: every cell keeps what it trained and sampled, and a
flow trained elsewhere (a checkpoint, a kept cell, an object) is scored by the tasks' metrics
without one optimiser step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import eqbench
from eqbench.artifacts import MODEL_FILE, SAMPLES_FILE, load_model, load_samples
from eqbench.errors import ConfigError
from eqbench.records import CellStore


def _scalars(cell):
    return {r.metric: r.value for r in cell.records if r.step is None}


@pytest.fixture(scope="module")
def bg_cell(tmp_path_factory):
    """One smoke bg-reweighting cell of the kernel flow on DW-2, with its artifacts."""
    root = tmp_path_factory.mktemp("bg")
    (cell,) = eqbench.run("bg-reweighting", "kernel-flow", "dw2", "smoke", results_dir=root)
    assert cell.status == "ok", cell.reason
    return root, cell


def test_a_cell_keeps_its_model_and_samples_listed_with_size_and_hash(bg_cell):
    root, cell = bg_cell
    assert set(cell.artifacts) == {MODEL_FILE, SAMPLES_FILE}
    for entry in cell.artifacts.values():
        path = root / entry["path"]
        assert path.is_file() and path.stat().st_size == entry["bytes"]
        import hashlib

        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    stored = CellStore(root).read("bg-reweighting", cell.cell_id)
    assert stored.artifacts == cell.artifacts  # the manifest is part of the cell file
    samples = load_samples(root / cell.artifacts[SAMPLES_FILE]["path"])
    n = int(_scalars(cell)["n_samples"])
    assert samples["x"].shape == (n, 2, 2) and samples["log_q"].shape == (n,) and samples["energy"].shape == (n,)
    # The kept energies are the system's energies of the kept samples (float32 positions).
    system = eqbench.get_system("dw2")
    torch.testing.assert_close(torch.from_numpy(samples["energy"]),
                               system.energy(torch.from_numpy(samples["x"]).double()), rtol=1e-5, atol=1e-5)


def test_the_kept_model_is_the_scored_model(bg_cell):
    """Rebuilt from its file, the model gives the log q the cell kept for its own samples."""
    root, cell = bg_cell
    directory = root / Path(cell.artifacts[MODEL_FILE]["path"]).parent
    flow, info = load_model(directory)
    assert (info["model"], info["system"]) == ("kernel-flow", "dw2")
    samples = load_samples(directory)
    x = torch.from_numpy(samples["x"][:20]).to(next(flow.parameters()).dtype)
    flow.with_solver(steps=cell.config["params"]["solver_steps"])  # the cell sampled with its solver setting
    log_q = flow.log_prob(x).detach().double().numpy()
    # float32 positions and the fixed-step solver run backwards: agreement to solver accuracy
    np.testing.assert_allclose(log_q, samples["log_q"][:20], atol=2e-2)


def test_no_artifacts_keeps_only_records(tmp_path):
    (cell,) = eqbench.run("test-nll", "kernel-flow", "dw2", "smoke", results_dir=tmp_path, artifacts=False)
    assert cell.status == "ok" and cell.artifacts == {}
    assert not (tmp_path / "artifacts").exists()


def test_rescoring_a_cells_saved_samples_reproduces_its_numbers_without_training(bg_cell, tmp_path):
    """The same samples and the same MCMC reference give the same reweighting numbers: evaluate
    re-scores, it does not retrain (the state is loaded, never stepped)."""
    root, cell = bg_cell
    directory = root / Path(cell.artifacts[MODEL_FILE]["path"]).parent
    before = (directory / MODEL_FILE).read_bytes()
    (scored,) = eqbench.evaluate(cell=directory, samples="saved", results_dir=tmp_path,
                                 overrides={"n_reference": cell.config["params"]["n_test"],
                                            "n_bootstrap": cell.config["params"]["n_bootstrap"],
                                            "energy_bins": cell.config["params"]["energy_bins"]})
    assert scored.status == "ok", scored.reason
    assert scored.config["model"] == "kernel-flow" and scored.config["params"]["source"]["kind"] == "cell"
    ours, theirs = _scalars(scored), _scalars(cell)
    for metric in ("ess_fraction", "mean_energy_reweighted", "mean_energy_flow", "energy_w2_reweighted",
                   "distance_w2_flow", "n_samples"):
        assert ours[metric] == pytest.approx(theirs[metric], rel=1e-9), metric
    assert (directory / MODEL_FILE).read_bytes() == before


def test_evaluate_never_trains_a_checkpoint(tmp_path, monkeypatch):
    """A pretrained flow is scored as it is: fit is never called, and the NLL is the NLL of the
    checkpoint's state (not of a freshly built model)."""
    import eqbench.train

    def refuse(*args, **kwargs):
        raise AssertionError("evaluate must not train")

    monkeypatch.setattr(eqbench.train, "fit", refuse)
    flow = eqbench.build_model("gaussian", "dw4")
    with torch.no_grad():
        flow.log_scale.fill_(np.log(1.7))
    path = tmp_path / "gauss.pt"
    torch.save(flow.state_dict(), path)
    (cell,) = eqbench.evaluate("gaussian", "dw4", checkpoint=path, results_dir=tmp_path / "r")
    assert cell.status == "ok", cell.reason
    source = cell.config["params"]["source"]
    assert source["kind"] == "checkpoint" and len(source["sha256"]) == 64
    test = eqbench.load_data("dw4", "test", n=cell.config["params"]["n_test"], seed=0)
    expected = float(-flow.log_prob(test).mean().detach())
    assert _scalars(cell)["nll_test"] == pytest.approx(expected, rel=1e-12)
    fresh = float(-eqbench.build_model("gaussian", "dw4").log_prob(test).mean().detach())
    assert abs(_scalars(cell)["nll_test"] - fresh) > 0.1  # the loaded state, not the built one


def test_an_object_is_identified_by_its_state(tmp_path):
    flow = eqbench.build_model("gaussian", "dw2")
    (first,) = eqbench.evaluate(flow, "dw2", name="mine", results_dir=tmp_path)
    (again,) = eqbench.evaluate(flow, "dw2", name="mine", results_dir=tmp_path)
    assert again.cell_id == first.cell_id and again.started_at == first.started_at  # read back, not rerun
    with torch.no_grad():
        flow.log_scale.add_(0.1)
    (changed,) = eqbench.evaluate(flow, "dw2", name="mine", results_dir=tmp_path)
    assert changed.cell_id != first.cell_id
    assert first.config["model"] == "mine" and first.config["task"] == "evaluate"


def test_evaluate_refuses_a_flow_that_breaks_the_contract(tmp_path):
    from eqbench.runner import ContractError

    class NotCoMFree(torch.nn.Module):
        """Samples with a centre of mass: its density is not comparable with the others'."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.n_parameters = 1

        def sample(self, n, generator=None):
            x = torch.randn(n, 4, 2, generator=generator, dtype=torch.float64)
            return x, -0.5 * (x ** 2).sum((1, 2))

        def log_prob(self, x, **kwargs):
            return -0.5 * (x ** 2).sum((1, 2)) + 0 * self.w

    with pytest.raises(ContractError):
        eqbench.evaluate(NotCoMFree(), "dw4", name="broken", results_dir=tmp_path)


def test_bad_evaluate_requests_are_one_line_errors(tmp_path, bg_cell):
    root, cell = bg_cell
    with pytest.raises(ConfigError, match="needs the system"):
        eqbench.evaluate("gaussian", results_dir=tmp_path)
    with pytest.raises(ConfigError, match="no kept model"):
        eqbench.evaluate(cell=tmp_path, results_dir=tmp_path)
    with pytest.raises(ConfigError, match="re-scores a cell's kept samples"):
        eqbench.evaluate("gaussian", "dw2", samples="saved", results_dir=tmp_path)
    directory = root / Path(cell.artifacts[MODEL_FILE]["path"]).parent
    with pytest.raises(ConfigError, match="trained on dw2, not dw4"):
        eqbench.evaluate(cell=directory, system="dw4", results_dir=tmp_path)


def test_evaluate_command_scores_a_kept_cell_and_lands_in_the_report(tmp_path, bg_cell):
    root, cell = bg_cell
    cell_json = CellStore(root).path("bg-reweighting", cell.cell_id)
    out = subprocess.run([sys.executable, "-m", "eqbench", "evaluate", "--cell", str(cell_json), "--results",
                          str(tmp_path), "--no-plot"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "nll_test" in out.stdout and "ess_fraction" in out.stdout
    table = CellStore(tmp_path).collect()
    assert set(table["task"]) == {"evaluate"} and set(table["model"]) == {"kernel-flow"}
    report = subprocess.run([sys.executable, "-m", "eqbench", "report", "--results", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "report.html").read_text()
    assert "Evaluated flows" in html
    bad = subprocess.run([sys.executable, "-m", "eqbench", "evaluate", "--model", "gaussian"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--system" in bad.stderr
    json.loads(cell_json.read_text())  # the source cell is untouched and readable


def test_community_test_split_scores_the_same_metrics(tmp_path):
    """test_source = community (issue 16): nll_test and the reference of the reweighting metrics
    come from the EFM/DEM test split, named in the units; the flow samples and the train / val NLLs
    do not change; a system without the split and an unknown source are refused with the reason."""
    from eqbench.data.external import reference_data_dir
    from eqbench.planning import NoCellsError
    from eqbench.runner import plan_cells

    if reference_data_dir() is None:
        pytest.skip("the community reference data (../shared/reference_data) are not beside this checkout")
    flow = eqbench.build_model("gaussian", "dw4")
    with torch.no_grad():
        flow.log_scale.fill_(np.log(1.3))
    (own,) = eqbench.evaluate(flow, "dw4", name="g", results_dir=tmp_path / "own")
    (cell,) = eqbench.evaluate(flow, "dw4", name="g", overrides={"test_source": "community"},
                               results_dir=tmp_path / "community")
    assert own.status == "ok" and cell.status == "ok", (own.reason, cell.reason)
    params = cell.config["params"]
    assert params["test_source"] == "community" and own.config["params"]["test_source"] == "eqbench"
    community = eqbench.load_data("dw4", "test", n=params["n_test"], seed=0, source="community")
    ours, theirs = _scalars(cell), _scalars(own)
    assert ours["nll_test"] == pytest.approx(float(-flow.log_prob(community).mean().detach()), rel=1e-12)
    units = {r.metric: r.unit for r in cell.records if r.step is None}
    for metric in ("nll_test", "mean_energy_mcmc", "energy_w2_flow", "distance_w2_flow", "dist_tv_flow",
                   "coord_w2_flow"):
        assert "community test split (EFM/DEM" in units[metric], metric
        assert ours[metric] != pytest.approx(theirs[metric], rel=1e-9), metric
    assert "compared with mean_energy_mcmc of the community test split" in units["mean_energy_reweighted"]
    for metric in ("nll_train", "nll_val", "ess_fraction", "mean_energy_reweighted"):
        assert ours[metric] == pytest.approx(theirs[metric], rel=1e-12), metric
    assert not any("community" in r.unit for r in own.records)
    with pytest.raises(NoCellsError, match="no community test split for harmonic; available for dw4, lj13"):
        plan_cells("evaluate", "gaussian", "harmonic", "smoke", overrides={"test_source": "community"})
    with pytest.raises(ConfigError, match="no community test split for harmonic; available for dw4, lj13"):
        eqbench.evaluate("gaussian", "harmonic", overrides={"test_source": "community"},
                         results_dir=tmp_path / "missing")
    assert not (tmp_path / "missing").exists() or not list((tmp_path / "missing").rglob("*.json"))
    with pytest.raises(ConfigError, match="test_source must be one of eqbench, community, got 'efm'"):
        eqbench.evaluate(flow, "dw4", name="g", overrides={"test_source": "efm"}, results_dir=tmp_path / "bad")
