"""Normalizing flows compared by the benchmark (paper §4-5, B.1-B.2): one family per module."""

from eqbench.flows.base import Flow
from eqbench.flows.prior import CoMFreeNormal

__all__ = ["Flow", "CoMFreeNormal"]
