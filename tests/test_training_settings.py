"""Training settings: part of every training task's profile, settable per model, validated, and
actually used by the training loop (not only recorded)."""

from __future__ import annotations

import math

import pytest
import torch

from eqbench.config import TRAINING_DEFAULTS, resolve_per_model
from eqbench.errors import ConfigError
from eqbench.planning import plan_cells
from eqbench.registry import MODELS, TASKS
from eqbench.train import TrainConfig, fit, lr_factor

TRAINING_TASKS = ("test-nll", "density-estimation", "bg-reweighting", "metastable-states", "dto-vs-otd")


@pytest.mark.parametrize("task", TRAINING_TASKS)
def test_every_profile_of_a_training_task_carries_the_papers_training_settings(task):
    obj = TASKS.get(task)
    assert obj.trains
    for profile in obj.profiles():
        params = obj.profile(profile)
        for key, value in TRAINING_DEFAULTS.items():
            assert key in params, (task, profile, key)
        assert params["optimizer"] == "adamw" and params["weight_decay"] == 0.01
        # The paper's lr for the paper's models; a per-model table may give the peers their
        # authors' learning rates (en-flow, se3-acf), never a paper model another one.
        lr = params["lr"]
        if isinstance(lr, dict):
            assert lr["default"] == 5e-3 and set(lr) - {"default"} <= {"en-flow", "se3-acf"}, (task, profile, lr)
            for model in ("kernel-flow", "gradient-flow", "schnet-flow", "node", "real-nvp"):
                assert resolve_per_model(params, model, MODELS.names())["lr"] == 5e-3
        else:
            assert lr == 5e-3
        assert params["grad_clip"] == "off"  # the paper clips nothing (C.1)
        assert params["kl_energy_cut"] == "off"  # nor regularises the energy


def test_training_settings_are_settable_and_recorded_per_cell():
    plans = plan_cells("test-nll", "kernel-flow", "dw2", "smoke",
                       overrides={"lr": 1e-3, "optimizer": "adam", "schedule": "cosine", "lr_warmup": 3,
                                  "grad_clip": 10.0, "weight_decay": 0.0, "kl_batch_size": 16})
    params = plans[0].config["params"]
    assert (params["lr"], params["optimizer"], params["schedule"], params["lr_warmup"], params["grad_clip"],
            params["weight_decay"], params["kl_batch_size"]) == (1e-3, "adam", "cosine", 3, 10.0, 0.0, 16)
    default = plan_cells("test-nll", "kernel-flow", "dw2", "smoke")[0]
    assert default.settings_key != plans[0].settings_key


def test_a_task_that_does_not_train_refuses_training_settings():
    with pytest.raises(ConfigError, match="unknown setting 'lr'"):
        plan_cells("timing", "kernel-flow", "dw4", "smoke", overrides={"lr": 1e-3})


@pytest.mark.parametrize("override, message", [
    ({"optimizer": "sgd"}, "unknown optimizer 'sgd'; valid: adamw, adam"),
    ({"schedule": "step"}, "unknown schedule 'step'; valid: constant, cosine"),
    ({"lr": 0}, "lr must be > 0"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"weight_decay": -1e-3}, "weight_decay must be >= 0"),
    ({"grad_clip": 0}, "grad_clip must be \"off\", \"dynamic\" or a number > 0"),
    ({"grad_clip": "median"}, "grad_clip must be \"off\", \"dynamic\" or a number > 0"),
    ({"lr_warmup": -1}, "lr_warmup must be an integer >= 0"),
    ({"kl_batch_size": 0}, "kl_batch_size must be an integer >= 1"),
    ({"kl_energy_cut": "on"}, "kl_energy_cut must be \"off\" or a finite energy in kT"),
    ({"kl_energy_cut": float("inf")}, "kl_energy_cut must be \"off\" or a finite energy in kT"),
    ({"micro_batch": 0}, "micro_batch must be \"off\" or an integer >= 1"),
    ({"micro_batch": 8.0}, "micro_batch must be \"off\" or an integer >= 1"),
    ({"micro_batch": True}, "micro_batch must be \"off\" or an integer >= 1"),
])
def test_bad_training_settings_are_one_line_errors_naming_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_cells("density-estimation", "kernel-flow", "dw4", "smoke", overrides=override)


def test_per_model_tables_give_each_model_its_value():
    lr = {"default": 5e-3, "real-nvp": 1e-3}
    for model, expected in (("real-nvp", 1e-3), ("kernel-flow", 5e-3)):
        plans = plan_cells("density-estimation", model, "dw4", "smoke", overrides={"lr": lr})
        assert {p.config["params"]["lr"] for p in plans} == {expected}
    # A table without "default" is an ordinary value (model_config, per-system tables).
    assert resolve_per_model({"eps": {"dw4": 0.01}}, "node", ["node"]) == {"eps": {"dw4": 0.01}}
    with pytest.raises(ConfigError, match="unknown models 'realnvp'"):
        plan_cells("density-estimation", "kernel-flow", "dw4", "smoke",
                   overrides={"lr": {"default": 5e-3, "realnvp": 1e-3}})


def _spy_on_fit(monkeypatch) -> list:
    """The TrainConfig of every call of eqbench.train.fit, in order."""
    import eqbench.train

    seen = []
    real_fit = eqbench.train.fit

    def spy(flow, system, data, config, **kwargs):
        seen.append(config)
        return real_fit(flow, system, data, config, **kwargs)

    monkeypatch.setattr(eqbench.train, "fit", spy)
    return seen


def test_profile_per_model_table_reaches_the_training_loop(monkeypatch):
    """The value a cell records is the value the optimiser got."""
    from eqbench.runner import run_cell

    seen = _spy_on_fit(monkeypatch)
    plan = plan_cells("test-nll", "kernel-flow", "dw2", "smoke",
                      overrides={"lr": {"default": 5e-3, "kernel-flow": 2e-3}, "schedule": "cosine",
                                 "optimizer": "adam", "grad_clip": 50.0, "iterations": 3})[0]
    result = run_cell(plan)
    assert result.status == "ok", result.reason
    (config,) = seen
    assert (config.lr, config.schedule, config.optimizer, config.grad_clip) == (2e-3, "cosine", "adam", 50.0)


def test_a_cell_trained_with_the_gradient_guard_says_how_often_it_skipped(monkeypatch):
    from eqbench.runner import run_cell

    seen = _spy_on_fit(monkeypatch)
    plan = plan_cells("test-nll", "kernel-flow", "dw2", "smoke", overrides={"grad_clip": "dynamic", "iterations": 3})[0]
    result = run_cell(plan)
    assert result.status == "ok", result.reason
    assert [c.grad_clip for c in seen] == ["dynamic"]
    skipped = [r for r in result.records if r.metric == "skipped_steps"]
    assert [r.value for r in skipped] == [0] and "gradient guard" in skipped[0].unit
    plain = run_cell(plan_cells("test-nll", "kernel-flow", "dw2", "smoke", overrides={"iterations": 3})[0])
    assert not [r for r in plain.records if r.metric == "skipped_steps"]


def test_lr_schedule_warms_up_linearly_and_cosine_decays_to_zero():
    cfg = TrainConfig(iterations=100, schedule="cosine", lr_warmup=10)
    assert [lr_factor(cfg, i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 55) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(cfg, 99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    constant = TrainConfig(iterations=100)
    assert {lr_factor(constant, i) for i in range(100)} == {1.0}


def _toy_fit(**options):
    from eqbench.components import build_model, get_system

    torch.manual_seed(0)
    system = get_system("dw2")
    flow = build_model("kernel-flow", system)
    x = torch.randn(64, 2, 2, generator=torch.Generator().manual_seed(1)) * 2
    x = x - x.mean(1, keepdim=True)
    result = fit(flow, system, x, TrainConfig(iterations=6, batch_size=16, log_every=1, **options), progress=False)
    return flow, result


def test_fit_applies_the_schedule_and_the_optimizer():
    _, result = _toy_fit(lr=1e-2, schedule="cosine", lr_warmup=2)
    cfg = TrainConfig(iterations=6, lr=1e-2, schedule="cosine", lr_warmup=2)
    assert [h["lr"] for h in result.history] == pytest.approx([1e-2 * lr_factor(cfg, i) for i in range(6)])
    adamw, _ = _toy_fit(weight_decay=0.5)
    adam, _ = _toy_fit(weight_decay=0.5, optimizer="adam")
    plain, _ = _toy_fit(weight_decay=0.0)
    plain_adam, _ = _toy_fit(weight_decay=0.0, optimizer="adam")
    params = [torch.cat([p.detach().flatten() for p in f.parameters()]) for f in (adamw, adam, plain, plain_adam)]
    # Without weight decay, Adam and AdamW take the same steps; with it, they differ (L2 vs decoupled).
    torch.testing.assert_close(params[2], params[3])
    assert not torch.allclose(params[0], params[1])


def test_grad_clip_bounds_the_gradient_the_optimiser_sees(monkeypatch):
    norms = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        total = sum(float(p.grad.pow(2).sum()) for g in self.param_groups for p in g["params"] if p.grad is not None)
        norms.append(math.sqrt(total))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    _, result = _toy_fit(grad_clip=1e-3)
    assert max(norms) <= 1e-3 * (1 + 1e-6)
    assert max(h["grad_norm"] for h in result.history) > 1e-3  # the unclipped norm is what history records


def test_dynamic_guard_follows_the_authors_rule_step_by_step():
    """The median rule by hand: 34 unbounded steps (window 100 starts 66 x 1e30 + 34 empty), then
    clip to 2 m and skip above 20 m, m the median of the window before the step."""
    from eqbench.grad_guard import GradientGuard

    guard = GradientGuard.authors()
    for _ in range(33):
        decision = guard.admit(1000.0)  # a huge spike would pass too: nothing is bounded yet
        assert not decision.skip and decision.limit > 1e29
    decision = guard.admit(1.0)  # 33 x 1e30 and 33 x 1000: the middle pair averages to ~5e29
    assert decision.limit > 1e29
    decision = guard.admit(1.0)  # 32 x 1e30, 33 x 1000, 1: the median is now 1000
    assert decision == (decision.__class__(skip=False, limit=2000.0))
    assert guard.admit(20_000.0).skip is False  # exactly 20 m is allowed ...
    assert guard.admit(20_001.0).skip is True  # ... above it is not
    assert guard.skipped == 1


def test_dynamic_guard_clips_and_skips_inside_the_training_loop(monkeypatch):
    import eqbench.train
    from eqbench.grad_guard import GradientGuard

    # A short window, so the guard acts within the toy fit's six steps (bounded from the third).
    monkeypatch.setattr(eqbench.train.GradientGuard, "authors", classmethod(lambda cls: cls(window=3)))
    real_norm = eqbench.train._grad_norm
    seen = []

    def spiky_norm(flow):
        factor = {4: 3.0, 5: 1e6}.get(len(seen) + 1, 1.0)  # the 4th: above 2 m, the 5th: above 20 m
        for p in flow.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        seen.append(real_norm(flow))
        return seen[-1]

    monkeypatch.setattr(eqbench.train, "_grad_norm", spiky_norm)
    steps, applied = [], []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        total = sum(float(p.grad.pow(2).sum()) for g in self.param_groups for p in g["params"] if p.grad is not None)
        applied.append(math.sqrt(total))
        steps.append(len(seen))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    _, guarded = _toy_fit(grad_clip="dynamic")
    replay = GradientGuard(window=3)
    decisions = [replay.admit(norm) for norm in seen]
    assert [d.skip for d in decisions] == [False, False, False, False, True, False]
    assert steps == [1, 2, 3, 4, 6]  # the fifth gradient was not applied
    assert guarded.skipped_steps == 1 and guarded.history[-1]["skipped_steps"] == 1
    expected = [min(seen[i], decisions[i].limit) for i in (0, 1, 2, 3, 5)]
    assert applied == pytest.approx(expected, rel=1e-5)
    assert decisions[3].limit < seen[3]  # the 4th was clipped ...
    assert applied[3] == pytest.approx(decisions[3].limit, rel=1e-5)  # ... to 2x the median
    unguarded = _toy_fit()[1]
    assert unguarded.skipped_steps is None and "skipped_steps" not in unguarded.history[-1]
