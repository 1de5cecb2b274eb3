"""What a cell keeps beside its numbers: the trained model and the flow's samples.

Why: a record is one number under one metric. Scoring a trained flow by a metric that did not
exist when it was trained (another ESS, a W2 on another observable) must not mean retraining
it; :func:`eqbench.evaluation.evaluate` re-scores a cell from these files. Every file is written
atomically (:mod:`eqbench.atomic`) under ``<results>/artifacts/<task>/<cell id>/`` and listed,
with its size and SHA-256, in the cell's ``artifacts`` entry:

- ``model.pt``: ``torch.save`` of a dict with the model's name, the system, the builder's
  ``model_config``, the code versions of the cell, and the ``state_dict`` (on the CPU) of the
  model that was scored (the selected checkpoint). :func:`load_model` rebuilds it with the
  same builder and settings and loads the state.
- ``samples.npz``: the flow samples the cell scored (``x``, float32, shape (n, N, D)), their
  exact ``log_q`` and energies ``energy`` (float64), plus task-specific arrays.

Small enough to keep by default: a state is kilobytes for the paper's equivariant flows and under
a megabyte for the largest real NVP; 10,000 samples with log q and energy are a few hundred kB to
about two MB (README "Artifacts" lists the measured sizes).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.atomic import atomic_write_bytes
from eqbench.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from eqbench.flows.base import Flow

__all__ = ["MODEL_FILE", "SAMPLES_FILE", "ArtifactWriter", "load_model", "load_samples",
           "model_payload"]

MODEL_FILE = "model.pt"
SAMPLES_FILE = "samples.npz"
#: Version of the model file's layout; bumped when its keys change.
MODEL_FORMAT = 1


def model_payload(flow: Flow, *, model: str, system: str, model_config: Mapping[str, Any],
                  code: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What ``model.pt`` holds: enough to rebuild ``flow`` with its builder and load its state."""
    return {"format": MODEL_FORMAT, "model": model, "system": system, "model_config": dict(model_config),
            "code": dict(code or {}), "n_parameters": int(flow.n_parameters),
            "state_dict": {k: v.detach().cpu().clone() for k, v in flow.state_dict().items()}}


@dataclass
class ArtifactWriter:
    """Writes a cell's artifacts into ``directory`` (``None``: keep nothing) and lists them.

    Example:
        >>> import tempfile, numpy as np
        >>> writer = ArtifactWriter(Path(tempfile.mkdtemp()))
        >>> writer.save_samples(np.zeros((3, 2, 2)), np.zeros(3), np.ones(3))
        >>> sorted(writer.manifest), writer.manifest["samples.npz"]["bytes"] > 0
        (['samples.npz'], True)
    """

    directory: Path | None
    #: ``{file name: {"path": relative to the results root, "bytes": size, "sha256": digest}}``.
    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)
    root: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _write(self, name: str, payload: bytes) -> None:
        assert self.directory is not None
        path = self.directory / name
        atomic_write_bytes(path, payload)
        shown = path.relative_to(self.root) if self.root is not None and path.is_relative_to(self.root) else path
        self.manifest[name] = {"path": str(shown), "bytes": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest()}

    def save_model(self, flow: Flow, *, model: str, system: str, model_config: Mapping[str, Any],
                   code: Mapping[str, str] | None = None) -> None:
        """Keep ``flow``'s state and how to rebuild it (:data:`MODEL_FILE`)."""
        if not self.enabled:
            return
        import torch

        buffer = io.BytesIO()
        torch.save(model_payload(flow, model=model, system=system, model_config=model_config, code=code), buffer)
        self._write(MODEL_FILE, buffer.getvalue())

    def save_samples(self, x: torch.Tensor | np.ndarray, log_q: torch.Tensor | np.ndarray,
                     energy: torch.Tensor | np.ndarray, **arrays: Any) -> None:
        """Keep the scored flow samples (float32 positions), their exact ``log q`` and energies."""
        if not self.enabled:
            return
        import numpy as np

        def as_np(a: Any, dtype: Any) -> np.ndarray:
            if hasattr(a, "detach"):
                a = a.detach().cpu().numpy()
            return np.asarray(a, dtype=dtype)

        buffer = io.BytesIO()
        np.savez(buffer, x=as_np(x, np.float32), log_q=as_np(log_q, np.float64), energy=as_np(energy, np.float64),
                 **{k: as_np(v, None) for k, v in arrays.items()})
        self._write(SAMPLES_FILE, buffer.getvalue())


def _resolve(path: str | Path, name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise DataError(f"no {name} at {path}: keep artifacts when running (the default; not --no-artifacts) "
                        "or name a file written by eqbench")
    return path


def load_model(path: str | Path, *, device: str = "cpu") -> tuple[Flow, dict[str, Any]]:
    """Rebuild the model saved in ``path`` (a ``model.pt`` or its cell's artifact directory) with
    its builder and settings, load its state, and return it in eval mode with the file's
    metadata (model, system, model_config, code).

    Example:
        >>> import tempfile, eqbench
        >>> flow = eqbench.build_model("kernel-flow", "dw4")
        >>> writer = ArtifactWriter(Path(tempfile.mkdtemp()))
        >>> writer.save_model(flow, model="kernel-flow", system="dw4", model_config={})
        >>> again, info = load_model(writer.directory)
        >>> info["model"], again.n_parameters
        ('kernel-flow', 620)
    """
    import torch

    from eqbench.components import build_model

    file = _resolve(path, MODEL_FILE)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read model file {file}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise DataError(f"{file} is not an eqbench model file (format {MODEL_FORMAT})")
    flow = build_model(payload["model"], payload["system"], payload["model_config"])
    try:
        flow.load_state_dict(payload["state_dict"])  # copies into the built tensors, keeping their dtype
    except RuntimeError as exc:
        raise DataError(f"{file} does not fit model {payload['model']!r} as built now (its code or settings changed): "
                        f"{' '.join(str(exc).split())[:300]}") from exc
    flow = flow.to(device).eval()
    return flow, {k: v for k, v in payload.items() if k != "state_dict"}


def load_samples(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``samples.npz`` (or its cell's artifact directory): ``x``, ``log_q``, ``energy``, ..."""
    import numpy as np

    file = _resolve(path, SAMPLES_FILE)
    with np.load(file) as data:
        return {k: data[k] for k in data.files}
