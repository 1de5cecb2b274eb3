"""Systems and models by name, and what a built model is: the layer tasks and the runner build on.

Here rather than in :mod:`eqbench.api` so that the lower layers (tasks, runner, cost) never import
the public facade, which imports them (DESIGN "Layers, one direction"); :mod:`eqbench.api`
re-exports these functions unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from eqbench.registry import MODELS, SYSTEMS

if TYPE_CHECKING:
    from eqbench.flows.base import Flow
    from eqbench.systems.base import ParticleSystem

__all__ = ["CAPABILITIES", "get_system", "build_model", "capabilities_of"]

#: What a task or a claim may require of a model, and the phrase used when a model lacks it.
CAPABILITIES: dict[str, str] = {
    "cnf": "is not a continuous flow: it has no velocity field or divergence",
    "trainable": "is fitted in closed form: it has no gradient-based training to run",
    "equivariant": "is not equivariant (claims no rotation/permutation symmetry)",
    "exact-density": "has no exact log-density (its log_prob is an estimate)",
}


def get_system(name: str | ParticleSystem) -> ParticleSystem:
    """A registered system by name (``dw2``, ``dw4``, ``lj13``, or a plugin's).

    Example:
        >>> get_system("dw4").n_particles
        4
    """
    from eqbench.systems.base import ParticleSystem

    if isinstance(name, ParticleSystem):
        return name
    return SYSTEMS.get(name)()


def build_model(name: str, system: str | ParticleSystem, config: Mapping[str, Any] | None = None) -> Flow:
    """Build a registered model (or a ``"module:attr"`` builder) for a system.

    Example:
        >>> build_model("kernel-flow", "dw4").n_parameters
        620
    """
    builder = MODELS.get(name)
    return builder(get_system(system), dict(config or {}))


def capabilities_of(flow: Flow) -> frozenset[str]:
    """What a built model is (keys of :data:`CAPABILITIES`): ``cnf`` (a
    :class:`~eqbench.flows.cnf.CNF`), ``trainable`` (gradient-trained parameters, no closed-form
    fit), ``equivariant`` (claims rotation and permutation symmetry), ``exact-density``
    (``log_prob`` is exact, not an importance-weighted estimate).

    Example:
        >>> sorted(capabilities_of(build_model("kernel-flow", "dw4")))
        ['cnf', 'equivariant', 'exact-density', 'trainable']
    """
    from eqbench.flows.cnf import CNF

    caps = set()
    if isinstance(flow, CNF):
        caps.add("cnf")
    if not hasattr(flow, "fit_closed_form") and flow.n_parameters > 0:
        caps.add("trainable")
    if {"rotation", "permutation"} <= set(getattr(flow, "symmetries", ())):
        caps.add("equivariant")
    if getattr(flow, "density_estimate", None) is None:
        caps.add("exact-density")
    return frozenset(caps)
