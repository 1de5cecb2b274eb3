"""Particle systems (paper §6): DW-2, DW-4 and LJ-13, registered lazily by name."""

from eqbench.systems.base import SYMMETRIES, DataProtocol, ParticleSystem

__all__ = ["SYMMETRIES", "DataProtocol", "ParticleSystem"]
