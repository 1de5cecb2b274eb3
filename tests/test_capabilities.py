"""Capabilities are declared by a model's builder, not found by building it with an empty config;
a builder's errors are one line naming the model; a model that is not what it declares is refused."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import eqbench
from eqbench.capabilities import CAPABILITIES, model_builder
from eqbench.components import build_model, capabilities_of, declared_capabilities, model_capabilities
from eqbench.errors import ConfigError, EqbenchError
from eqbench.planning import plan_cells
from eqbench.runner import ContractError, preflight

CALLS: list[dict] = []


@model_builder(capabilities=["trainable", "exact-density", "cnf"], description="needs a checkpoint")
def needs_checkpoint(system, config):
    """A builder that cannot be built without its checkpoint (as a pretrained plugin's)."""
    CALLS.append(dict(config))
    path = config["checkpoint"]  # a bare KeyError when missing: eqbench must report it in one line
    flow = build_model("node", system)
    flow.checkpoint = path
    return flow


@model_builder(capabilities=["trainable", "exact-density", "cnf", "equivariant"])
def claims_too_much(system, config):
    """Declares equivariance, builds the non-equivariant nODE."""
    return build_model("node", system, config)


def undeclared_needs_checkpoint(system, config):
    """Declares nothing and needs a key: can only be judged by building it."""
    return build_model("node", system, {"hidden": config["hidden"]})


MODULE = types.ModuleType("capability_plugins")
MODULE.needs_checkpoint = needs_checkpoint
MODULE.claims_too_much = claims_too_much
MODULE.undeclared_needs_checkpoint = undeclared_needs_checkpoint
sys.modules["capability_plugins"] = MODULE


def test_builtin_declarations_match_what_they_build():
    for model in ("kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"):
        for system in ("dw4", "lj13"):
            assert declared_capabilities(model) == capabilities_of(build_model(model, system)), (model, system)


def test_planning_never_builds_a_declared_model():
    CALLS.clear()
    plans = plan_cells("density-estimation", "capability_plugins:needs_checkpoint", "dw4", "smoke")
    # Not equivariant: one plain and one augmented variant, decided from the declaration alone.
    assert sorted(p.params["variant"] for p in plans) == ["", "aug"]
    assert CALLS == []
    assert model_capabilities("capability_plugins:needs_checkpoint", "dw4") == {"trainable", "exact-density", "cnf"}
    assert CALLS == []


def test_a_builder_error_is_one_line_naming_model_and_system():
    with pytest.raises(EqbenchError) as info:
        build_model("capability_plugins:needs_checkpoint", "dw4", {})
    message = str(info.value)
    assert "capability_plugins:needs_checkpoint" in message and "dw4" in message and "KeyError" in message
    assert "\n" not in message
    out = subprocess.run([sys.executable, "-c",
                          "import sys, tests.test_capabilities; from eqbench.cli import main; "
                          "sys.exit(main(['run', '--task', 'test-nll', '--model', "
                          "'capability_plugins:needs_checkpoint', '--system', 'dw2', '--results', sys.argv[1]]))",
                          str(__import__("tempfile").mkdtemp())], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "needs_checkpoint" in out.stderr and "KeyError" in out.stderr


def test_a_model_that_is_not_what_it_declares_is_refused_before_scoring():
    (plan,) = plan_cells("test-nll", "capability_plugins:claims_too_much", "dw2", "smoke")
    with pytest.raises(ContractError, match="declares capabilities .*equivariant.* but builds"):
        preflight([plan])


def test_undeclared_builders_are_built_to_judge_and_errors_say_how_to_declare():
    with pytest.raises(ConfigError, match="model_builder"):
        plan_cells("density-estimation", "capability_plugins:undeclared_needs_checkpoint", "dw4", "smoke")


def test_declarations_are_checked():
    with pytest.raises(ConfigError, match="unknown capabilities 'equivarient'"):
        model_builder(capabilities=["equivarient"])
    assert eqbench.model_builder is model_builder and set(eqbench.CAPABILITIES) == set(CAPABILITIES)
