"""eqbench: a benchmark for equivariant flows on many-particle Boltzmann densities.

Reproduces and extends Köhler, Klein & Noé, "Equivariant Flows: Exact Likelihood Generative
Learning for Symmetric Densities" (ICML 2020). The public API is re-exported here lazily, so
``import eqbench`` (and ``eqbench list``) does not import torch::

    import eqbench
    system = eqbench.get_system("lj13")
    x = eqbench.load_data("dw4", split="train", n=1000, seed=0)
    cells = eqbench.run(task="test-nll", model="gaussian", system="dw4", profile="smoke")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from eqbench import catalog as _catalog  # noqa: E402,F401  (registers the built-ins; imports no torch)
from eqbench.capabilities import CAPABILITIES, model_builder  # noqa: E402  (torch-free: plugins declare with it)

_API = ("get_system", "load_data", "build_model", "run", "evaluate", "list_systems", "list_models", "list_tasks")

__all__ = [*_API, "CAPABILITIES", "model_builder", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from eqbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'eqbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
