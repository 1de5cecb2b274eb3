"""Score a flow that eqbench did not train, by the protocol of the tasks (the ``evaluate`` task).

Three ways to name what is scored, each recorded as the cell's ``source`` with a content hash,
so a cell says exactly which weights it scored and the same weights are never scored twice:

- a registered model (or ``module:attr`` builder) and a ``checkpoint``: the model is built with
  ``model_config`` and the checkpoint's state loaded (an eqbench ``model.pt`` or a plain
  ``state_dict`` file);
- a ``cell``: the model a finished cell kept (:mod:`eqbench.artifacts`), rebuilt with the
  builder and settings it was trained with; ``samples="saved"`` re-scores the samples that cell
  kept without drawing new ones, so a new metric never needs retraining or resampling;
- a flow object in Python (an :class:`eqbench.flows.base.Flow`), named by ``name``.

The loaded flow passes the pre-flight contract check (:func:`eqbench.runner.flow_facts`) on its
actual weights before it is scored; cells land in the same results store as every task, so
``collect`` and ``report`` show them beside the paper's models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eqbench.artifacts import MODEL_FILE, SAMPLES_FILE, load_model
from eqbench.data.diagnostics import sha256_file
from eqbench.config import apply_overrides
from eqbench.errors import ConfigError
from eqbench.flows.flat import load_checkpoint
from eqbench.planning import CellPlan, check_data_for, check_sample_counts, default_results_dir, seed_list
from eqbench.records import CellResult, CellStore, check_results_dir
from eqbench.registry import MODELS, TASKS
from eqbench.runner import flow_facts, run_cell
from eqbench.versions import eqbench_code_version, object_code_version

if TYPE_CHECKING:
    from eqbench.flows.base import Flow

__all__ = ["evaluate", "resolve_cell_artifacts", "state_sha256"]

TASK = "evaluate"


def state_sha256(flow: Flow) -> str:
    """SHA-256 over a flow's state (names, dtypes, shapes and values): the identity of an object source."""
    digest = hashlib.sha256()
    for key, value in sorted(flow.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def resolve_cell_artifacts(cell: str | Path) -> Path:
    """The artifact directory of a cell given as that directory, its ``model.pt``, or its cell
    JSON file (``<results>/cells/<task>/<cell id>.json``)."""
    path = Path(cell)
    if path.is_file() and path.suffix == ".json":
        stored = CellStore(path.parents[2]).read(path.parent.name, path.stem)
        if stored is None:
            raise ConfigError(f"{path} is not a readable cell file")
        if MODEL_FILE not in stored.artifacts:
            raise ConfigError(f"cell {path.stem} kept no model (it ran with --no-artifacts, or its task trains none)")
        return path.parents[2] / Path(stored.artifacts[MODEL_FILE]["path"]).parent
    if path.is_file() and path.name == MODEL_FILE:
        return path.parent
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return path
    raise ConfigError(f"no kept model at {path}: give a cell's artifact directory "
                      f"(<results>/artifacts/<task>/<cell id>), its {MODEL_FILE}, or its cell JSON file")


def _source(flow: Any, system: str | None, *, name: str | None, checkpoint: str | Path | None,
            cell: str | Path | None, model_config: Mapping[str, Any] | None,
            ) -> tuple[str, str, Any, dict[str, Any], dict[str, Any], str]:
    """(model name, system name, loaded flow, model_config, source, model code version)."""
    from eqbench.components import build_model, get_system

    if cell is not None:
        if flow is not None or checkpoint is not None:
            raise ConfigError("give either a cell or a model/flow (with its checkpoint), not both")
        directory = resolve_cell_artifacts(cell)
        loaded, info = load_model(directory)
        if system is not None and get_system(system).name != info["system"]:
            raise ConfigError(f"cell {directory.name} was trained on {info['system']}, not {system}")
        source = {"kind": "cell", "path": str(directory.resolve()), "cell_id": directory.name,
                  "task": directory.parent.name, "sha256": sha256_file(directory / MODEL_FILE)}
        return (info["model"], info["system"], loaded, dict(info["model_config"]), source,
                object_code_version(MODELS.get(info["model"])))
    if system is None:
        raise ConfigError("evaluate needs the system the flow models (e.g. system='dw4')")
    system_name = get_system(system).name
    if isinstance(flow, str):
        config = dict(model_config or {})
        built = build_model(flow, system, config)
        if checkpoint is not None:
            load_checkpoint(built, checkpoint)
            source = {"kind": "checkpoint", "path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint)}
        else:
            source = {"kind": "built"}
        return flow, system_name, built, config, source, object_code_version(MODELS.get(flow))
    if flow is None or not hasattr(flow, "log_prob") or not hasattr(flow, "sample"):
        raise ConfigError("evaluate scores a model name, a cell, or a Flow object "
                          f"(with log_prob and sample), got {type(flow).__name__}")
    if checkpoint is not None:
        load_checkpoint(flow, checkpoint)
    label = name or type(flow).__name__
    source = {"kind": "object", "type": f"{type(flow).__module__}.{type(flow).__qualname__}",
              "sha256": state_sha256(flow)}
    return label, system_name, flow, dict(model_config or {}), source, object_code_version(type(flow))


def evaluate(
    flow: str | Flow | None = None,
    system: str | None = None,
    profile: str = "smoke",
    *,
    name: str | None = None,
    checkpoint: str | Path | None = None,
    cell: str | Path | None = None,
    model_config: Mapping[str, Any] | None = None,
    samples: str = "draw",
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    results_dir: str | Path | None = None,
    device: str = "cpu",
    rerun: bool = False,
    progress: bool | None = None,
    artifacts: bool = True,
) -> list[CellResult]:
    """Score a trained flow with the ``evaluate`` task's metrics, without training it.

    ``flow``: a model name (with ``checkpoint`` and ``model_config``), a Flow object (with
    ``name``), or ``None`` with ``cell`` (a cell's kept model; ``samples="saved"`` re-scores
    its kept samples). ``profile`` sets the sample sizes (``eqbench describe evaluate``);
    ``overrides`` change them. Results go to ``results_dir`` (default ``results/<profile>``),
    one cell per seed, read back when already finished.

    Example:
        >>> import eqbench, tempfile
        >>> flow = eqbench.build_model("gaussian", "dw2")
        >>> cells = evaluate(flow, "dw2", name="my-gaussian", results_dir=tempfile.mkdtemp())
        >>> cells[0].status, cells[0].config["params"]["source"]["kind"]
        ('ok', 'object')
    """
    from eqbench.components import declared_capabilities, get_system
    from eqbench.devices import resolve_device

    task = TASKS.get(TASK)
    device = resolve_device(device)
    root = check_results_dir(default_results_dir(profile) if results_dir is None else results_dir)  # before any work
    model, system_name, loaded, config, source, model_code = _source(
        flow, system, name=name, checkpoint=checkpoint, cell=cell, model_config=model_config)
    params = apply_overrides(task.profile(profile), dict(overrides or {}), f"task {TASK} profile {profile}")
    params.update(source=source, samples=samples, model_config=config)
    if samples == "saved" and source["kind"] == "cell" and not (Path(source["path"]) / SAMPLES_FILE).is_file():
        raise ConfigError(f"cell {source['cell_id']} ({source['task']}) kept no samples: its task draws none, or it ran "
                          "without artifacts; evaluate it with samples='draw' (--samples draw)")
    task.validate(params)
    if not task.expand_cell(params, model, system_name):  # as `run --task evaluate` does: refuse before any work
        raise ConfigError(task.no_cells_reason(params, model, system_name))
    check_sample_counts(task, params, get_system(system_name))  # no split holds more than its protocol's size
    check_data_for([CellPlan(TASK, model, system_name, profile, 0, params)])  # read-only cache: refuse up front
    seeds = seed_list(params, seed)
    params.pop("seeds", None)
    code = {"eqbench": eqbench_code_version()}
    if model_code != code["eqbench"]:
        code["model"] = model_code
    system_obj = get_system(system_name)
    declared = declared_capabilities(model) if source["kind"] != "object" else None
    info = flow_facts(loaded.to(device) if hasattr(loaded, "to") else loaded, system_obj, model, declared)
    store = CellStore(root)
    results = []
    for s in seeds:
        plan = CellPlan(TASK, model, system_name, profile, int(s), params, code, model_info=info)
        if not rerun:
            cached = store.read(TASK, plan.cell_id)
            if cached is not None and cached.status == "ok" and cached.records:
                results.append(cached)
                continue
        result = run_cell(plan, device=device, progress=progress, flow=loaded, results_root=store.root,
                          artifacts_dir=store.artifact_dir(TASK, plan.cell_id) if artifacts else None)
        store.write(result)
        results.append(result)
    return results
