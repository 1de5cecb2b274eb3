"""Resumable reference-data MCMC: a killed run resumes from its checkpoint with the same bits."""

from __future__ import annotations

import numpy as np
import pytest

import eqbench
from eqbench.data import mcmc, store

SETTINGS = dict(n_chains=6, samples_per_chain=4, burn_in=20, stride=5, step_size=0.5, seed=3, trace_every=2)


class Killed(Exception):
    pass


def _killed_after(monkeypatch, calls: int) -> None:
    """Make the ``calls``-th Metropolis step raise, as a kill would stop the process there."""
    real = mcmc._metropolis_step
    count = [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(mcmc, "_metropolis_step", step)


def _same(a: mcmc.MetropolisRun, b: mcmc.MetropolisRun) -> None:
    for field in ("samples", "energies", "trace", "distance_trace", "burn_in_means"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.acceptance == b.acceptance


@pytest.mark.parametrize("kill_at", [10, 30])  # during the burn-in, during the production
def test_a_killed_run_resumes_with_the_same_bits(monkeypatch, tmp_path, kill_at):
    system = eqbench.get_system("dw2")
    reference = mcmc.run_metropolis(system, **SETTINGS)
    path = tmp_path / "chains.partial.npz"
    with monkeypatch.context() as patch:
        _killed_after(patch, kill_at)
        with pytest.raises(Killed):
            mcmc.run_metropolis(system, **SETTINGS, checkpoint=path, checkpoint_every=7)
    assert path.exists()
    with np.load(path) as state:
        assert int(state["done"]) == 7 * ((kill_at - 1) // 7)  # the last checkpoint before the kill
    calls = [0]
    real = mcmc._metropolis_step

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mcmc, "_metropolis_step", counting)
    with pytest.warns(UserWarning, match=f"resuming from its checkpoint at step {7 * ((kill_at - 1) // 7)} of 40"):
        resumed = mcmc.run_metropolis(system, **SETTINGS, checkpoint=path, checkpoint_every=7)
    _same(resumed, reference)
    total = SETTINGS["burn_in"] + SETTINGS["samples_per_chain"] * SETTINGS["stride"]
    assert calls[0] == total - 7 * ((kill_at - 1) // 7)  # only the steps after the checkpoint ran again


def test_a_checkpoint_of_another_run_is_refused(monkeypatch, tmp_path):
    system = eqbench.get_system("dw2")
    path = tmp_path / "chains.partial.npz"
    with monkeypatch.context() as patch:
        _killed_after(patch, 10)
        with pytest.raises(Killed):
            mcmc.run_metropolis(system, **SETTINGS, checkpoint=path, checkpoint_every=7)
    with pytest.raises(ValueError, match="belongs to another run"):
        mcmc.run_metropolis(system, **{**SETTINGS, "seed": 4}, checkpoint=path, checkpoint_every=7)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        mcmc.run_metropolis(system, **SETTINGS, checkpoint=path)


def test_ensure_dataset_resumes_a_killed_generation_and_removes_its_checkpoint(monkeypatch, tmp_path):
    """The cached data set of a generation killed half-way and restarted is the one an
    uninterrupted generation writes (same sha256), and no checkpoint is left behind."""
    import json

    harmonic = eqbench.get_system("harmonic")
    monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path / "straight"))
    store.ensure_dataset(harmonic, "val")
    straight = json.loads(store.dataset_paths(harmonic, "val")[1].read_text())["sha256"]

    monkeypatch.setenv("EQBENCH_CACHE", str(tmp_path / "killed"))
    protocol = harmonic.data_protocol
    total = protocol.burn_in + (protocol.size("val") // protocol.chains("val") + 2) * protocol.stride
    monkeypatch.setattr(mcmc.run_metropolis, "__kwdefaults__",
                        {**mcmc.run_metropolis.__kwdefaults__, "checkpoint_every": max(1, total // 3)})
    with monkeypatch.context() as patch:
        _killed_after(patch, total // 2)
        with pytest.raises(Killed):
            store.ensure_dataset(harmonic, "val")
    assert store.checkpoint_path(harmonic, "val").exists()
    with pytest.warns(UserWarning, match="resuming from its checkpoint"):
        store.ensure_dataset(harmonic, "val")
    assert json.loads(store.dataset_paths(harmonic, "val")[1].read_text())["sha256"] == straight
    assert not store.checkpoint_path(harmonic, "val").exists()
