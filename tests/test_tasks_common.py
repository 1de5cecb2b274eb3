"""What every registered task owes its users (issue 4), checked across all tasks at once."""

from __future__ import annotations

import pytest

from eqbench.errors import ConfigError
from eqbench.registry import MODELS, SYSTEMS, TASKS
from eqbench.runner import plan_cells

PAPER_TASKS = ["density-estimation", "bg-reweighting", "metastable-states", "divergence-cost", "dto-vs-otd", "timing"]


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_every_profile_plans_for_every_supported_pair(task):
    """smoke, quick, paper and calibrate resolve to valid cells for each supported (model,
    system); each unsupported pair is refused before any work with a reason naming the task."""
    task_obj = TASKS.get(task)
    assert {"smoke", "quick", "paper", "calibrate"} <= set(task_obj.profiles())
    supported = 0
    for system in task_obj.systems or SYSTEMS.names():
        for model in ("kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"):
            try:
                task_obj.check_supported(system, model)
            except ConfigError as exc:
                assert task in str(exc) and len(str(exc)) > len(task) + 20, str(exc)
                continue
            supported += 1
            for profile in ("smoke", "quick", "paper", "calibrate"):
                assert plan_cells(task, model, system, profile), (task, model, system, profile)
    assert supported >= 2


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_task_documents_its_protocol(task):
    import sys

    task_obj = TASKS.get(task)
    doc = sys.modules[type(task_obj).__module__].__doc__ or ""
    assert "paper" in doc.lower() and len(doc) > 300, f"{task}: the module docstring must state the protocol"
    assert task_obj.summary and task_obj.name == task


def test_models_listed_are_the_registered_ones():
    assert {"kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp", "gaussian"} <= set(MODELS.names())
