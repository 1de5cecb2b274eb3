"""Benchmark tasks (paper §7, B): each expands into cells and returns records per cell."""

from eqbench.tasks.base import CellContext, Task

__all__ = ["CellContext", "Task"]
