"""Training snapshots (eqbench.snapshots): a fit stopped mid-way and run again gives, bit for bit,
the parameters, validation curve and records of one uninterrupted fit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import eqbench
import eqbench.train as train_module
from eqbench.errors import ConfigError
from eqbench.planning import plan_cells
from eqbench.records import CellStore
from eqbench.runner import run_cell
from eqbench.snapshots import SnapshotPlan, SnapshotSlot, check_snapshot_interval
from eqbench.train import TrainConfig, fit


class Stop(Exception):
    """Stands in for a kill (time limit, SIGKILL) between two iterations."""


def _data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = 1.5 * torch.randn(2 * n, 4, 2, generator=torch.Generator().manual_seed(seed))
    x = x - x.mean(1, keepdim=True)
    return x[:n], x[n:]


#: Every source of state a resumed fit must restore: the data generator (batches, augmentation),
#: torch's global generator (Hutchinson probes of the nODE, reverse-KL samples), the optimiser's
#: moments, the spectral-norm vectors of the residual flow, the best-validation checkpoint.
CONFIG = TrainConfig(iterations=6, batch_size=8, kl_batch_size=8, lambda_start=0.0, lambda_end=0.5, augment=True,
                     selection="best-validation", validate_every=2, lr=5e-3, seed=3)


def _build(model: str, dw4, seed: int):
    torch.manual_seed(seed)
    return eqbench.build_model(model, dw4)


def _stop_at(monkeypatch, iteration: int) -> None:
    real = train_module.lambda_at

    def lambda_at(config, i):
        if i == iteration:
            raise Stop(f"stopped before iteration {i}")
        return real(config, i)

    monkeypatch.setattr(train_module, "lambda_at", lambda_at)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("model", ["kernel-flow", "node", "g-resflow"])
def test_stopped_fit_resumes_bit_for_bit(model, dw4, tmp_path, monkeypatch):
    train, val = _data()
    reference = _build(model, dw4, seed=0)
    whole = fit(reference, dw4, train, CONFIG, validation=val, progress=False)

    slot = SnapshotSlot(tmp_path / "fit-0.pt", every_s=0.0)  # a snapshot after every iteration
    _stop_at(monkeypatch, 4)
    with pytest.raises(Stop):
        fit(_build(model, dw4, seed=0), dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    monkeypatch.undo()
    assert slot.path.is_file()

    earlier_s = torch.load(slot.path, weights_only=False)["elapsed_s"]
    # A fresh process builds the model again (here with other initial parameters on purpose).
    resumed_flow = _build(model, dw4, seed=123)
    resumed = fit(resumed_flow, dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    assert resumed.resumed_from_iteration == 4 and whole.resumed_from_iteration is None
    # Its seconds count the stopped run's too: what the tasks record as the training time.
    assert resumed.earlier_wall_s == earlier_s > 0 and whole.earlier_wall_s == 0.0
    assert resumed.wall_s + resumed.validation_wall_s > earlier_s
    _same_state(resumed_flow, reference)
    assert resumed.validation == whole.validation
    assert resumed.selected_iteration == whole.selected_iteration
    assert resumed.iterations_done == whole.iterations_done == CONFIG.iterations
    drop_wall = [{k: v for k, v in entry.items() if k != "wall_s"} for entry in whole.history]
    assert [{k: v for k, v in entry.items() if k != "wall_s"} for entry in resumed.history] == drop_wall
    # The random stream after training is the uninterrupted one's too (the cell samples next).
    torch.manual_seed(0)
    fit(_build(model, dw4, seed=0), dw4, train, CONFIG, validation=val, progress=False)
    after_whole = torch.rand(3)
    fit(_build(model, dw4, seed=0), dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    assert torch.equal(torch.rand(3), after_whole)


def test_without_restoring_the_random_state_the_fit_differs(dw4, tmp_path, monkeypatch):
    """The test above can fail: a resume that forgets torch's global generator (the nODE's
    Hutchinson probes) ends with other parameters."""
    train, val = _data()
    reference = _build("node", dw4, seed=0)
    fit(reference, dw4, train, CONFIG, validation=val, progress=False)
    slot = SnapshotSlot(tmp_path / "fit-0.pt", every_s=0.0)
    _stop_at(monkeypatch, 4)
    with pytest.raises(Stop):
        fit(_build("node", dw4, seed=0), dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    monkeypatch.undo()
    monkeypatch.setattr(train_module, "_set_random_state", lambda state, device: None)
    flow = _build("node", dw4, seed=0)
    fit(flow, dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    assert not all(torch.equal(a, b) for a, b in zip(flow.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize("restore_guard", [True, False])
def test_stopped_fit_with_the_gradient_guard_resumes_bit_for_bit(restore_guard, dw4, tmp_path, monkeypatch):
    """The guard's window of gradient norms is training state too: resumed with it, the fit is the
    uninterrupted one; resumed with a fresh window (the negative control), it is not."""
    from eqbench.grad_guard import GradientGuard

    # Window 3 and a clip factor of 0.5, so the guard clips every step from the third on.
    monkeypatch.setattr(train_module.GradientGuard, "authors",
                        classmethod(lambda cls: cls(window=3, clip_factor=0.5)))
    config = dataclasses.replace(CONFIG, grad_clip="dynamic")
    train, val = _data()
    reference = _build("kernel-flow", dw4, seed=0)
    whole = fit(reference, dw4, train, config, validation=val, progress=False)
    slot = SnapshotSlot(tmp_path / "fit-0.pt", every_s=0.0)
    real_lambda_at = train_module.lambda_at
    _stop_at(monkeypatch, 4)
    with pytest.raises(Stop):
        fit(_build("kernel-flow", dw4, seed=0), dw4, train, config, validation=val, progress=False, snapshot=slot)
    monkeypatch.setattr(train_module, "lambda_at", real_lambda_at)
    if not restore_guard:
        monkeypatch.setattr(GradientGuard, "load_state_dict", lambda self, state: None)
    flow = _build("kernel-flow", dw4, seed=0)
    resumed = fit(flow, dw4, train, config, validation=val, progress=False, snapshot=slot)
    same = all(torch.equal(a, b) for a, b in zip(flow.state_dict().values(), reference.state_dict().values()))
    assert same is restore_guard
    if restore_guard:
        assert resumed.validation == whole.validation and resumed.skipped_steps == whole.skipped_steps


def test_finished_fit_is_not_trained_again(dw4, tmp_path, monkeypatch):
    train, val = _data()
    slot = SnapshotSlot(tmp_path / "fit-0.pt", every_s=0.0)
    first = _build("kernel-flow", dw4, seed=0)
    done = fit(first, dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    _stop_at(monkeypatch, 0)  # any training iteration would raise
    again = _build("kernel-flow", dw4, seed=7)
    result = fit(again, dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    _same_state(again, first)
    assert result.resumed_from_iteration == CONFIG.iterations
    assert result.earlier_wall_s == pytest.approx(done.wall_s + done.validation_wall_s)
    assert result.validation == done.validation and result.selected_iteration == done.selected_iteration
    assert not again.training  # returned in eval mode, as a trained flow is


def test_snapshot_of_other_settings_or_data_is_ignored(dw4, tmp_path):
    train, val = _data()
    slot = SnapshotSlot(tmp_path / "fit-0.pt", every_s=0.0)
    fit(_build("kernel-flow", dw4, seed=0), dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    other = TrainConfig(**{**CONFIG.__dict__, "lr": 1e-3})
    with pytest.warns(UserWarning, match="other settings or data"):
        result = fit(_build("kernel-flow", dw4, seed=0), dw4, train, other, validation=val, progress=False,
                     snapshot=slot)
    assert result.resumed_from_iteration is None
    with pytest.warns(UserWarning, match="other settings or data"):
        result = fit(_build("kernel-flow", dw4, seed=0), dw4, train + 0.01, CONFIG, validation=val, progress=False,
                     snapshot=slot)
    assert result.resumed_from_iteration is None


def test_short_fit_writes_no_snapshot(dw4, tmp_path):
    train, val = _data()
    slot = SnapshotSlot(tmp_path / "fit-0.pt", every_s=3600.0)
    fit(_build("kernel-flow", dw4, seed=0), dw4, train, CONFIG, validation=val, progress=False, snapshot=slot)
    assert not slot.path.exists()


def test_snapshot_interval_checks():
    assert check_snapshot_interval("off") is None and check_snapshot_interval(None) is None
    assert check_snapshot_interval("0") == 0.0
    for bad in ("-1", "soon", "nan", True):
        with pytest.raises(ConfigError, match="snapshot-every"):
            check_snapshot_interval(bad)


def _scores(result):
    """The records that must not depend on being interrupted: all but wall-clock ones."""
    return sorted((r.metric, r.step if r.step is not None else -1, r.value) for r in result.records
                  if r.unit != "s" and not r.metric.endswith("wall_s"))


def test_cell_stopped_in_its_second_training_phase_resumes(tmp_path, monkeypatch):
    """bg-reweighting trains twice (ML, then the λ-mix): a cell stopped in the second phase
    resumes without training the first again, and scores what an uninterrupted cell scores."""
    plan = plan_cells("bg-reweighting", "kernel-flow", "dw4", "smoke", seed=0,
                      overrides={"pretrain_iterations": 4, "mix_iterations": 4})[0]
    whole = run_cell(plan)  # no snapshots
    store = CellStore(tmp_path)
    where = store.snapshot_dir(plan.task, plan.cell_id)

    calls = {"n": 0}
    real = train_module.lambda_at

    def lambda_at(config, i):
        if config.lambda_end > 0 and i == 2:  # the λ-mix phase, mid-way
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(config, i)

    monkeypatch.setattr(train_module, "lambda_at", lambda_at)
    with pytest.raises(KeyboardInterrupt):
        run_cell(plan, snapshot_dir=where, snapshot_every_s=0.0)
    assert sorted(p.name for p in where.iterdir()) == ["fit-0.pt", "fit-1.pt"]
    stored = [torch.load(where / f"fit-{k}.pt", weights_only=False) for k in (0, 1)]
    assert stored[0]["final"] and not stored[1]["final"]

    def no_first_phase(config, i):
        assert config.lambda_end > 0, "the finished maximum-likelihood phase was trained again"
        return real(config, i)

    monkeypatch.setattr(train_module, "lambda_at", no_first_phase)
    resumed = run_cell(plan, snapshot_dir=where, snapshot_every_s=0.0)
    assert resumed.status == "ok", resumed.reason
    assert resumed.provenance["resumed"] == "fit 0 from iteration 4 of 4; fit 1 from iteration 2 of 4"
    assert "resumed" not in whole.provenance
    assert _scores(resumed) == _scores(whole)
    train_s = {r.metric: r.value for r in resumed.records}["train_wall_s"]
    assert train_s >= stored[0]["result"].wall_s + stored[1]["elapsed_s"]  # the stopped run's seconds count
    store.write(resumed)
    assert not where.exists()  # a finished cell keeps no snapshots


def test_failed_cell_keeps_its_snapshots(tmp_path):
    store = CellStore(tmp_path)
    plan = plan_cells("density-estimation", "kernel-flow", "dw4", "smoke", seed=0)[0]
    where = store.snapshot_dir(plan.task, plan.cell_id)
    where.mkdir(parents=True)
    (where / "fit-0.pt").write_bytes(b"x")
    from eqbench.runner import failed_result

    store.write(failed_result(plan, "cell exceeded its time limit of 1 s", "cpu"))
    assert (where / "fit-0.pt").exists()


def test_snapshot_plan_numbers_training_calls(tmp_path):
    plan = SnapshotPlan(tmp_path, every_s=1.0)
    assert [plan.next_slot().path.name for _ in range(3)] == ["fit-0.pt", "fit-1.pt", "fit-2.pt"]
    assert plan.calls == 3 and plan.describe() == ""
