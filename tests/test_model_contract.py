"""Every registered model passes the same contract (eqbench.testing.check_flow), in float64.

CNFs are built with 8 RK4 steps here (2 for the autograd-divergence gradient flows and the E(n) CNF on LJ-13,
whose every exact evaluation costs 39 double-backward passes): the contract checks the
machinery (exact divergence, symmetries, invertibility, gradients), not the accuracy of the
default 20-step grid; the models' own test files check the 20-step solver.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import eqbench
from eqbench.registry import MODELS
from eqbench.testing import check_flow
from tests.conftest import REPO

CNF_MODELS = {"kernel-flow", "gradient-flow", "schnet-flow", "node", "en-flow"}
SYSTEMS = ["dw4", "lj13"]


def _config(model: str, system: str) -> dict:
    if model in ("gradient-flow", "schnet-flow", "en-flow") and system == "lj13":
        return {"steps": 2}
    return {"steps": 8} if model in CNF_MODELS else {}


#: Contract runs of a minute or more on one loaded core (39 brute-force trace passes per ODE
#: stage through an EGNN): run with the slow tests; the fast run checks these models on dw4.
SLOW_CASES = {("en-flow", "lj13")}


@pytest.mark.parametrize("model, system_name", [
    pytest.param(m, s, marks=pytest.mark.slow) if (m, s) in SLOW_CASES else (m, s)
    for m in MODELS.names() for s in SYSTEMS])
def test_registered_model_passes_contract(model, system_name):
    system = eqbench.get_system(system_name)
    report = check_flow(lambda: eqbench.build_model(model, system, _config(model, system_name)), system)
    assert "every_parameter_gets_gradient" in report.passed
    assert "state_dict_round_trip" in report.passed


def test_paper_models_are_registered():
    assert {"kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp"} <= set(MODELS.names())


PLUGIN_MODULE = '''
"""A third-party flow: a learnable isotropic scale, shipped outside eqbench."""
import torch
from torch import nn
from eqbench.flows.base import Flow
from eqbench.systems.base import SYMMETRIES


class ScaleFlow(Flow):
    symmetries = SYMMETRIES

    def __init__(self, system):
        super().__init__(system)
        self.log_scale = nn.Parameter(torch.tensor(0.1))
        self.n_dof = system.n_dof

    def forward(self, z):
        return z * self.log_scale.exp(), (self.n_dof * self.log_scale).expand(z.shape[0])

    def inverse(self, x):
        x = x - x.mean(dim=-2, keepdim=True)
        return x * (-self.log_scale).exp(), (-self.n_dof * self.log_scale).expand(x.shape[0])


def build(system, config):
    return ScaleFlow(system)
'''


def test_plugin_model_from_another_package_is_listed_and_passes(tmp_path):
    """A package installed beside eqbench (a dist-info with an entry point) adds a model."""
    (tmp_path / "scaleflow_pkg.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / "scaleflow_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: scaleflow-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[eqbench.models]\nscale-flow = scaleflow_pkg:build\n")
    code = textwrap.dedent("""
        import eqbench
        from eqbench.cli import main
        from eqbench.testing import check_flow
        assert main(["list", "models"]) == 0
        system = eqbench.get_system("dw4")
        report = check_flow(lambda: eqbench.build_model("scale-flow", system), system)
        print("PASSED", len(report.passed))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(row for row in out.stdout.splitlines() if row.startswith("scale-flow"))
    assert "plugin scaleflow-pkg" in line
    assert "PASSED" in out.stdout


def test_module_path_model_passes_contract(tmp_path, monkeypatch):
    (tmp_path / "scaleflow_mod.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    system = eqbench.get_system("lj13")
    report = check_flow(lambda: eqbench.build_model("scaleflow_mod:build", system), system)
    assert "rotation_equivariant" in report.passed and "translation_invariant" in report.passed


def test_check_flow_catches_a_broken_model(tmp_path, monkeypatch):
    """The checker must fail a model whose logdet is wrong (a test that cannot fail is no test)."""
    broken = PLUGIN_MODULE.replace("(self.n_dof * self.log_scale)", "(0.5 * self.n_dof * self.log_scale)")
    (tmp_path / "broken_scaleflow.py").write_text(broken)
    monkeypatch.syspath_prepend(str(tmp_path))
    system = eqbench.get_system("dw4")
    with pytest.raises(AssertionError):
        check_flow(lambda: eqbench.build_model("broken_scaleflow:build", system), system)
