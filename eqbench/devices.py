"""Device selection for ``--device`` (the code runs on CPU and CUDA alike)."""

from __future__ import annotations

from eqbench.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str) -> str:
    """Validate a ``--device`` string: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, auto") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; valid: cpu, cuda, cuda:N, auto")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; valid: cpu, auto")
    return str(parsed)
