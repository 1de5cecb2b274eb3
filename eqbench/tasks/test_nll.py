"""``test-nll``: the smallest end-to-end task: fit one model, score its NLL on train and test.

The model is fitted by maximum likelihood on ``n_train`` samples of the training pool: in closed
form where the model has one (the CoM-free Gaussian baseline), otherwise by ``iterations`` steps
of :func:`eqbench.train.fit` (AdamW, paper C.1). It is scored on the independent test set (SPEC
§3) before and after training, with the exact divergence (SPEC §4: models that train with
Hutchinson are scored exactly). NLL is in nats per configuration on the CoM-free subspace,
Gaussian constant included (SPEC §1). The density-estimation task sweeps this protocol over
training-set sizes and variants; this task is the quick check that a model learns at all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from eqbench.records import Record
from eqbench.tasks.base import CellContext, Task
from eqbench.tasks.common import (check_finite, guard_records, mean_nll, nll_records, positive_int, train_flow,
                                  training_loss_records)

__all__ = ["TestNLL", "TASK", "mean_nll"]


class TestNLL(Task):
    __test__ = False  # not a pytest test class despite its name

    name = "test-nll"
    trains = True
    summary = "fit one model by maximum likelihood on n_train samples; NLL on train and test before/after"
    grid_axes = ("n_train",)
    data_splits = {"n_train": "train", "n_test": "test"}

    def validate(self, params: Mapping[str, Any]) -> None:
        for key in ("n_train", "n_test", "iterations", "batch_size"):
            positive_int(params, key)

    def cost_phases(self, params: Mapping[str, Any], system: str) -> dict[str, float]:
        """Training costs per configuration-step (iterations x batch); scoring is the remainder."""
        return {"fit_wall_s": params["iterations"] * params["batch_size"]}

    def run_cell(self, ctx: CellContext) -> list[Record]:
        import torch

        from eqbench.components import build_model
        from eqbench.data.loading import load_data

        p = ctx.params
        flow = build_model(ctx.model, ctx.system, p.get("model_config", {})).to(ctx.device)
        dtype = next(flow.parameters()).dtype
        train = load_data(ctx.system, split="train", n=p["n_train"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        test = load_data(ctx.system, split="test", n=p["n_test"], seed=ctx.seed, dtype=dtype, device=ctx.device)
        torch.manual_seed(ctx.seed)
        records = [ctx.record("n_parameters", flow.n_parameters, "count"),
                   *nll_records(ctx, flow, test, "nll_test_untrained")]
        start = time.perf_counter()
        result = train_flow(ctx, flow, train, iterations=p["iterations"], batch_size=p["batch_size"],
                            augment=bool(p.get("augment", False)))
        ctx.keep_model(flow)
        records += training_loss_records(ctx, result, curve=False)
        records.append(ctx.record("fit_wall_s", time.perf_counter() - start + result.earlier_wall_s, "s"))
        records += guard_records(ctx, result)
        records += nll_records(ctx, flow, train, "nll_train")
        records += nll_records(ctx, flow, test, "nll_test")
        check_finite(records)
        return records


TASK = TestNLL()
