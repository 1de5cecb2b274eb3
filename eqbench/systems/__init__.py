"""Particle systems (paper §6): DW-2, DW-4 and LJ-13, registered lazily by name.

Each system declares its kind (:data:`SYSTEM_KINDS`) and length scales, from which every model
takes its default settings (:mod:`eqbench.flows.defaults`).
"""

from eqbench.systems.base import SYMMETRIES, SYSTEM_KINDS, DataProtocol, ParticleSystem

__all__ = ["SYMMETRIES", "SYSTEM_KINDS", "DataProtocol", "ParticleSystem"]
