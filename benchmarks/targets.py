"""Measure the performance targets once on this machine: ``python -m benchmarks.targets``.

Not an asv suite (asv finds no benchmarks here); the numbers go into the note / README.
Run with the environment fixed (``make bench-targets`` does: one thread, glibc malloc
thresholds). Every figure is a median over repeats; ratios are medians of back-to-back rounds
(:func:`benchmarks.common.median_time_ratio`), so slow load drifts hit both sides alike.

Targets (issue 5, item 5):

1. closed-form divergence <= 1.5x the velocity alone (batch 64);
2. closed form >= 20x faster than brute force at 13 particles;
3. kernel flow the fastest CNF to train (one ML iteration, batch 64, DW-4 and LJ-13);
4. 10,000 LJ-13 samples with exact log-weights from the kernel flow within 1.5x of sampling
   them without the divergence (velocity-only RK4 solve, same steps, no weights);
5. a Metropolis step of many chains within 1.5x of one batched energy evaluation;
6. fitted cost exponent vs N: ~2 for closed form and Hutchinson, ~3 for brute force.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torchdiffeq import odeint

import eqbench
from eqbench.data.mcmc import _metropolis_step
from eqbench.tasks.divergence_cost import fit_power_law
from eqbench.timing import evaluation_call, repeat_seconds, sample_step, train_step

from .bench_divergence import make_inputs
from .common import fix_environment, median_time_ratio


def divergence_ratios(repeat: int) -> dict:
    out = {}
    flow, x = make_inputs(13)
    velocity, closed, brute = (evaluation_call(flow, x, m) for m in (None, "closed-form", "brute-force"))
    out["lj13_closed_over_velocity"] = median_time_ratio(closed, velocity, repeat=repeat)
    out["lj13_brute_over_closed"] = median_time_ratio(brute, closed, repeat=repeat)
    torch.manual_seed(0)
    system = eqbench.get_system("dw4")
    flow = eqbench.build_model("kernel-flow", system)
    x = system.initial_configurations(64, torch.Generator().manual_seed(0)).float()
    velocity, closed, brute = (evaluation_call(flow, x, m) for m in (None, "closed-form", "brute-force"))
    out["dw4_closed_over_velocity"] = median_time_ratio(closed, velocity, repeat=repeat)
    out["dw4_brute_over_closed"] = median_time_ratio(brute, closed, repeat=repeat)
    return out


def exponents(repeats: int) -> dict:
    """Median seconds per evaluation (batch 64) vs N and the least-squares log-log slope."""
    counts = {"velocity": [16, 32, 64, 128], "closed-form": [16, 32, 64, 128],
              "hutchinson": [16, 32, 64, 128], "brute-force": [16, 32, 64]}
    out = {}
    for method, ns in counts.items():
        times = []
        for n in ns:
            flow, x = make_inputs(n)
            call = evaluation_call(flow, x, None if method == "velocity" else method)
            slow = method == "brute-force" and n > 32  # ~3 s per call
            times.append(statistics.median(repeat_seconds(call, repeats=3 if slow else repeats, warmup=1)))
        fit = fit_power_law(ns, times)
        out[method] = {"counts": ns, "median_s": times, "exponent": fit.exponent}
    return out


def training(repeats: int) -> dict:
    variants = [("kernel-flow", {}), ("gradient-flow", {}), ("schnet-flow", {}), ("node", {}),
                ("node", {"train_divergence": "brute-force"})]
    out = {}
    for system_name in ("dw4", "lj13"):
        system = eqbench.get_system(system_name)
        data = system.initial_configurations(1000, torch.Generator().manual_seed(0)).float()
        for model, config in variants:
            torch.manual_seed(0)
            flow = eqbench.build_model(model, system, config)
            label = model + ("" if not config else "(" + config["train_divergence"] + ")")
            n = repeats if model in ("kernel-flow", "node") else max(3, repeats // 3)
            out[f"{system_name}/{label}"] = statistics.median(repeat_seconds(train_step(flow, data), repeats=n))
        kernel = out[f"{system_name}/kernel-flow"]
        for key in [k for k in out if k.startswith(system_name + "/")]:
            out[key + " / kernel"] = out[key] / kernel
    return out


def sampling(n_samples: int, repeats: int) -> dict:
    system = eqbench.get_system("lj13")
    torch.manual_seed(0)
    flow = eqbench.build_model("kernel-flow", system)
    flow.eval()
    batch = 1000
    exact = sample_step(flow, system, batch=batch)
    grid = torch.linspace(0.0, 1.0, flow.solver.steps + 1)

    def plain() -> torch.Tensor:  # the same RK4 solve of the velocity alone, no log q, no weights
        with torch.no_grad():
            z = flow.prior.sample(batch, dtype=torch.float32)
            flow._solve_constants = flow._compute_constants()
            try:
                return odeint(flow.velocity, z, grid[[0, -1]], method="rk4",
                              options={"step_size": 1.0 / flow.solver.steps})[-1]
            finally:
                flow._solve_constants = None

    def many(step):
        def run():
            for _ in range(n_samples // batch):
                step()
        return run

    exact(), plain()
    times = {"exact": [], "plain": []}
    for r in range(repeats):  # interleaved, order alternating
        for name in (("exact", "plain") if r % 2 == 0 else ("plain", "exact")):
            start = time.perf_counter()
            many(exact if name == "exact" else plain)()
            times[name].append(time.perf_counter() - start)
    ratios = [e / p for e, p in zip(times["exact"], times["plain"])]
    return {"n_samples": n_samples, "exact_median_s": statistics.median(times["exact"]),
            "plain_median_s": statistics.median(times["plain"]), "ratio_median": statistics.median(ratios)}


def metropolis(repeat: int) -> dict:
    out = {}
    for name in ("dw4", "lj13"):
        system = eqbench.get_system(name)
        for chains in (1000, 10000):
            generator = torch.Generator().manual_seed(0)
            x = system.initial_configurations(chains, generator)
            u = system.energy(x)
            step_size = system.data_protocol.step_size
            out[f"{name}/{chains}"] = median_time_ratio(
                lambda: _metropolis_step(system, x, u, step_size, generator),
                lambda: system.energy(x), repeat=repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--only", nargs="*", default=["divergence", "metropolis", "sampling", "exponents", "training"])
    args = parser.parse_args()
    fix_environment()
    results = {}
    for part in args.only:
        start = time.perf_counter()
        if part == "divergence":
            results[part] = divergence_ratios(args.repeats)
        elif part == "metropolis":
            results[part] = metropolis(args.repeats)
        elif part == "sampling":
            results[part] = sampling(args.samples, max(3, args.repeats // 3))
        elif part == "exponents":
            results[part] = exponents(args.repeats)
        elif part == "training":
            results[part] = training(args.repeats)
        results[part + "_wall_s"] = time.perf_counter() - start
        print(json.dumps({part: results[part]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
