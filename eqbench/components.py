"""Systems and models by name, and what a built model is: the layer tasks and the runner build on.

Here rather than in :mod:`eqbench.api` so that the lower layers (tasks, runner, cost) never import
the public facade, which imports them (DESIGN "Layers, one direction"); :mod:`eqbench.api`
re-exports these functions unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from eqbench.capabilities import CAPABILITIES, checked_capabilities, model_builder
from eqbench.errors import CellTimeout, ConfigError, EqbenchError
from eqbench.registry import MODELS, SYSTEMS

if TYPE_CHECKING:
    from eqbench.flows.base import Flow
    from eqbench.systems.base import ParticleSystem

__all__ = ["CAPABILITIES", "DATA_ON_REQUEST", "default_data_systems", "get_system", "build_model", "capabilities_of", "model_builder",
           "declared_capabilities", "model_capabilities", "validate_model_config"]

DATA_ON_REQUEST: tuple[str, ...] = ("lj13-single", "lj55")


def default_data_systems() -> list[str]:
    """The systems ``eqbench data`` covers without arguments: every registered one (plugins
    included) except :data:`DATA_ON_REQUEST`."""
    return [name for name in SYSTEMS.names() if name not in DATA_ON_REQUEST]


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


def declared_capabilities(name: str) -> frozenset[str] | None:
    """The capabilities the builder of model ``name`` declares (:func:`model_builder`), or ``None``."""
    declared = getattr(MODELS.get(name), "capabilities", None)
    if declared is None:
        return None
    return checked_capabilities(declared, f"model {name!r}")


def build_model(name: str, system: str | ParticleSystem, config: Mapping[str, Any] | None = None) -> Flow:
    """Build a registered model (or a ``"module:attr"`` builder) for a system.

    A builder that raises gives a one-line error naming the model and the system (a
    :class:`~eqbench.errors.ConfigError` for a bad setting, else an
    :class:`~eqbench.errors.EqbenchError` chained to the original exception).

    Example:
        >>> build_model("kernel-flow", "dw4").n_parameters
        620
    """
    builder = MODELS.get(name)
    system_obj = get_system(system)
    try:
        return builder(system_obj, dict(config or {}))
    except ConfigError as exc:
        raise ConfigError(f"model {name!r} on {system_obj.name}: {exc}") from exc
    except (EqbenchError, CellTimeout):
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())
        raise EqbenchError(f"model {name!r} failed to build for system {system_obj.name}: "
                           f"{type(exc).__name__}: {text}") from exc


def validate_model_config(name: str, system: str | ParticleSystem, config: Mapping[str, Any] | None = None) -> bool:
    """Check model ``name``'s settings ``config`` without building it, by the validator its
    builder declares (``model_builder(validate=...)``); ``False`` when it declares none (the
    pre-flight then judges the settings when it builds the model, in the cell's process).

    A bad setting is a one-line :class:`~eqbench.errors.ConfigError` naming the model and the
    system, as :func:`build_model` gives it; a validator that fails otherwise is an
    :class:`~eqbench.errors.EqbenchError` naming the model.

    Example:
        >>> validate_model_config("kernel-flow", "dw4", {"steps": 2.7})
        Traceback (most recent call last):
        ...
        eqbench.errors.ConfigError: model 'kernel-flow' on dw4: kernel-flow setting steps must be a positive integer; got 2.7
    """
    check = getattr(MODELS.get(name), "validate_config", None)
    if check is None:
        return False
    system_obj = get_system(system)
    try:
        check(system_obj, dict(config or {}))
    except ConfigError as exc:
        raise ConfigError(f"model {name!r} on {system_obj.name}: {exc}") from exc
    except EqbenchError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())
        raise EqbenchError(f"model {name!r}: its settings validator failed on {system_obj.name}: "
                           f"{type(exc).__name__}: {text}") from exc
    return True


def model_capabilities(name: str, system: str | ParticleSystem,
                       config: Mapping[str, Any] | None = None) -> frozenset[str]:
    """What model ``name`` is: the capabilities its builder declares (:func:`model_builder`),
    or, for a builder that declares none, those of the model built with ``config``.

    Example:
        >>> sorted(model_capabilities("node", "dw4"))
        ['cnf', 'exact-density', 'trainable']
    """
    declared = declared_capabilities(name)
    if declared is not None:
        return declared
    return capabilities_of(build_model(name, system, config))


def capabilities_of(flow: Flow) -> frozenset[str]:
    """What a built model is (keys of :data:`CAPABILITIES`): ``cnf`` (a
    :class:`~eqbench.flows.cnf.CNF`), ``trainable`` (gradient-trained parameters, no closed-form
    fit), ``equivariant`` (claims rotation and permutation symmetry), ``exact-density``
    (``log_prob`` is exact, not an importance-weighted estimate), ``augmented`` (a flow on an
    augmented space with an exact joint density, ``flow.augmented``: :mod:`eqbench.flows.augmented`).

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
    if getattr(flow, "augmented", False):
        caps.add("augmented")
    return frozenset(caps)
