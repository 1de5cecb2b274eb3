"""``test-nll``: the smallest end-to-end task, fit in closed form and score the test NLL.

The model is fitted by maximum likelihood in closed form on ``n_train`` samples of the training
pool (only models with ``fit_closed_form`` qualify, e.g. the CoM-free Gaussian baseline), then
scored on the independent test set (SPEC §3). The NLL is in nats per configuration on the
CoM-free subspace, with the Gaussian constant included (SPEC §1); the trace is exact (a linear
flow's log-determinant is analytic). It gives each system the reference NLL a trained flow
has to beat.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from eqbench.errors import ConfigError
from eqbench.records import Record
from eqbench.tasks.base import CellContext, Task

__all__ = ["TestNLL", "TASK"]


def _positive_int(params: Mapping[str, Any], key: str) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer sample count, got {value!r}")
    return value


class TestNLL(Task):
    __test__ = False  # not a pytest test class despite its name

    name = "test-nll"
    summary = "closed-form ML fit on n_train samples; NLL on train and test (minimal end-to-end task)"
    grid_axes = ("n_train",)

    def validate(self, params: Mapping[str, Any]) -> None:
        _positive_int(params, "n_train")
        _positive_int(params, "n_test")

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch

        from eqbench.api import build_model, load_data

        n_train = _positive_int(ctx.params, "n_train")
        n_test = _positive_int(ctx.params, "n_test")
        flow = build_model(ctx.model, ctx.system).to(ctx.device)
        if not hasattr(flow, "fit_closed_form"):
            raise ConfigError(f"model {ctx.model!r} has no closed-form fit; task {self.name} needs one (e.g. gaussian)")
        dtype = next(flow.parameters()).dtype
        train = load_data(ctx.system, split="train", n=n_train, seed=ctx.seed, dtype=dtype, device=ctx.device)
        test = load_data(ctx.system, split="test", n=n_test, seed=ctx.seed, dtype=dtype, device=ctx.device)
        start = time.perf_counter()
        flow.fit_closed_form(train)
        fit_s = time.perf_counter() - start
        with torch.no_grad():
            nll_train = -flow.log_prob(train).mean().item()
            nll_test = -flow.log_prob(test).mean().item()
        records = [
            ctx.record("nll_train", nll_train, "nats, exact"),
            ctx.record("nll_test", nll_test, "nats, exact"),
            ctx.record("n_parameters", flow.n_parameters, "count"),
            ctx.record("fit_wall_s", fit_s, "s"),
        ]
        for record in records:
            if not math.isfinite(record.value):
                raise FloatingPointError(f"{record.metric} is not finite ({record.value})")
        return records


TASK = TestNLL()
