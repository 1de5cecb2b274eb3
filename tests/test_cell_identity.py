"""Cell identity and pre-flight: settings keys, code versions, per-profile results, the contract
check that refuses a broken model before any cell of it is scored."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import eqbench
from eqbench.errors import EqbenchError
from eqbench.flows.base import Flow
from eqbench.records import CellStore, settings_key
from eqbench.runner import ContractError, code_versions, plan_cells, preflight
from eqbench.versions import eqbench_code_version, object_code_version, source_hash


# -- models for the pre-flight -------------------------------------------------------------------

class ShiftedFlow(Flow):
    """Flat-coordinate flow that is not CoM-free: x = z + b with a CoM-carrying offset b."""

    def __init__(self, system):
        super().__init__(system)
        self.scale = torch.nn.Parameter(torch.ones(()))
        offset = torch.arange(system.n_particles * system.n_dims, dtype=torch.float32)
        self.register_buffer("offset", offset.reshape(system.n_particles, system.n_dims))

    def forward(self, z):
        return z * self.scale + self.offset, z.new_full(z.shape[:1], float(self.prior.n_dof) * torch.log(self.scale.abs()))

    def inverse(self, x):
        return (x - self.offset) / self.scale, x.new_full(x.shape[:1], -float(self.prior.n_dof) * torch.log(self.scale.abs()))


def build_shifted(system, config):
    return ShiftedFlow(system)


class FakeRotationFlow(Flow):
    """Claims rotation and permutation symmetry but scales the first coordinate axis only."""

    symmetries = ("rotation", "permutation", "translation")

    def __init__(self, system):
        super().__init__(system)
        self.log_s = torch.nn.Parameter(torch.tensor(0.5))

    def _scale(self, like):
        s = torch.ones(like.shape[-1], dtype=like.dtype)
        s[0] = torch.exp(self.log_s)
        return s

    def forward(self, z):
        s = self._scale(z)
        return z * s, z.new_full(z.shape[:1], 1.0) * (self.n_particles - 1) * self.log_s

    def inverse(self, x):
        s = self._scale(x)
        return x / s, -x.new_full(x.shape[:1], 1.0) * (self.n_particles - 1) * self.log_s


def build_fake_rotation(system, config):
    return FakeRotationFlow(system)


# -- settings key --------------------------------------------------------------------------------

def test_settings_key_ignores_only_the_seed():
    base = {"task": "t", "model": "m", "system": "dw4", "profile": "quick", "seed": 0,
            "params": {"lr": 1e-3, "n_train": 10}, "code": {"eqbench": "1"}}
    assert settings_key(base) == settings_key({**base, "seed": 3})
    for change in ({"profile": "smoke"}, {"params": {"lr": 2e-3, "n_train": 10}}, {"code": {"eqbench": "2"}},
                   {"model": "m2"}):
        assert settings_key({**base, **change}) != settings_key(base), change


def test_plans_share_a_settings_key_across_seeds_only():
    plans = plan_cells("test-nll", "gaussian", "dw2", "smoke", overrides={"seeds": [0, 1], "n_train": [10, 20]})
    keys = {}
    for plan in plans:
        keys.setdefault(plan.params["n_train"], set()).add(plan.settings_key)
    assert len(plans) == 4
    assert all(len(v) == 1 for v in keys.values()) and keys[10] != keys[20]
    assert plans[0].config["code"] == {"eqbench": eqbench_code_version()}


# -- code versions -------------------------------------------------------------------------------

def test_source_hash_changes_with_the_code(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    before = source_hash(pkg)
    (pkg / "__init__.py").write_text("x = 2\n")
    assert source_hash(pkg) != before
    (pkg / "__init__.py").write_text("x = 1\n")
    assert source_hash(pkg) == before


def test_foreign_model_code_is_part_of_the_cell_id():
    versions = code_versions("test-nll", f"{__name__}:build_shifted")
    assert versions["eqbench"] == eqbench_code_version()
    assert versions["model"] == object_code_version(build_shifted) != versions["eqbench"]
    assert "src." in versions["model"]


def test_changed_plugin_code_never_reuses_old_cells(tmp_path, cli):
    """A model given as module:attr, run, edited, run again: the second run computes new cells."""
    module = tmp_path / "myflows.py"
    source = textwrap.dedent("""
        from eqbench.flows.gaussian import build as _build

        def build(system, config):
            return _build(system, config)  # VERSION
    """)
    module.write_text(source.replace("VERSION", "v1"))
    env = {"PYTHONPATH": str(tmp_path)}
    args = ("run", "--task", "test-nll", "--model", "myflows:build", "--system", "harmonic", "--profile", "smoke",
            "--results", str(tmp_path / "res"), "--no-plot")
    first = cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    again = cli(*args, env=env)
    assert again.returncode == 0
    cells = sorted((tmp_path / "res" / "cells" / "test-nll").glob("*.json"))
    assert len(cells) == 1  # unchanged code: the finished cell is reused
    module.write_text(source.replace("VERSION", "v2"))
    third = cli(*args, env=env)
    assert third.returncode == 0, third.stderr
    cells = sorted((tmp_path / "res" / "cells" / "test-nll").glob("*.json"))
    assert len(cells) == 2
    versions = {json.loads(p.read_text())["config"]["code"]["model"] for p in cells}
    assert len(versions) == 2 and all("myflows" in v and "src." in v for v in versions)


# -- pre-flight ----------------------------------------------------------------------------------

def test_preflight_attaches_capabilities_and_density_kind():
    plans = preflight(plan_cells("test-nll", "kernel-flow", "dw4", "smoke"))
    info = plans[0].model_info
    assert info["capabilities"] == ["cnf", "equivariant", "exact-density", "trainable"]
    assert info["density"] == "exact" and info["n_parameters"] == 620
    assert "sample_log_prob_agree" in info["contract"] and "rotation_equivariant" in info["contract"]


def test_preflight_refuses_a_flow_that_is_not_com_free(tmp_path):
    with pytest.raises(ContractError, match="not CoM-free"):
        eqbench.run("test-nll", f"{__name__}:build_shifted", "dw2", "smoke", results_dir=tmp_path)
    assert not (tmp_path / "cells").exists()  # refused before any cell ran


def test_preflight_refuses_a_false_symmetry_claim(tmp_path):
    with pytest.raises(ContractError, match="claims rotation equivariance"):
        eqbench.run("test-nll", f"{__name__}:build_fake_rotation", "dw4", "smoke", results_dir=tmp_path)


def test_cli_refusal_is_one_line_with_exit_code_2(tmp_path, cli):
    out = cli("run", "--task", "test-nll", "--model", "test_cell_identity:build_shifted", "--system", "dw2",
              "--results", str(tmp_path), "--no-plot", env={"PYTHONPATH": str(Path(__file__).parent)})
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "fails the flow contract" in out.stderr


def test_preflight_errors_are_eqbench_errors():
    assert issubclass(ContractError, EqbenchError)


# -- results per profile -------------------------------------------------------------------------

def test_default_results_directory_is_per_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cells = eqbench.run("test-nll", "gaussian", "harmonic", "smoke", progress=False)
    assert cells[0].status == "ok"
    assert (tmp_path / "results" / "smoke" / "cells" / "test-nll").is_dir()
    table = CellStore(tmp_path / "results" / "smoke").collect()
    assert set(table["profile"]) == {"smoke"}
    assert set(table["capabilities"]) == {"equivariant;exact-density"}
    assert set(table["settings_key"]) == {cells[0].settings_key}
    assert table["code_version"].str.startswith("eqbench=").all()


def test_reading_commands_name_the_profile_directories(tmp_path, cli):
    for profile in ("smoke", "quick"):
        (tmp_path / "results" / profile / "cells").mkdir(parents=True)
    out = cli("report", cwd=tmp_path)
    assert out.returncode == 2
    assert "results/quick" in out.stderr and "results/smoke" in out.stderr


def test_sweep_checks_models_in_its_workers(tmp_path):
    """A sweep's parent never runs model code (a model may kill its process); the worker runs the
    pre-flight before the model's first cell there, and a breach fails the model's cells with the
    breach as their reason while the other models' cells finish."""
    from eqbench.sweep import sweep

    _, results = sweep("test-nll", ["gaussian", "test_cell_identity:build_shifted"], ["harmonic"], "smoke",
                       jobs=2, threads=1, results_dir=tmp_path, progress=False)
    by_model = {r.config["model"]: r for r in results}
    assert by_model["gaussian"].status == "ok"
    assert by_model["gaussian"].model_info["capabilities"] == ["equivariant", "exact-density"]
    bad = by_model["test_cell_identity:build_shifted"]
    assert bad.status == "failed" and "fails the flow contract" in bad.reason and "CoM-free" in bad.reason
    assert not bad.records
