"""Public checkers for flow models: the contract every registered (or plugin) model must pass.

Use it in a plugin's own tests::

    from eqbench.testing import check_flow
    report = check_flow(lambda: my_build(system, {}), system)   # raises AssertionError on failure

The checks (DESIGN "Registry"; issue "Models"): finite shapes; samples CoM-free; ``sample`` and
``log_prob`` agree, and ``log_prob`` does not depend on the module's training mode (scores are
exact unless an estimator is asked for by name); ``inverse(forward(z)) ≈ z``; ``log|det|`` against the brute-force Jacobian;
for CNFs the divergence against the autograd trace; each *claimed* symmetry holds under random
rotations, reflections, permutations and translations, and each unclaimed one of rotation and
permutation is shown to be broken; every parameter gets a gradient of the training objective
(:meth:`~eqbench.flows.base.Flow.training_log_prob`); a state_dict round trip
reproduces the density. Tolerances are in float64 and leave room for the ODE discretisation
of the CNFs (DTO, 20 RK4 steps), which the exact checks (divergence, symmetries) do not need.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eqbench.flows.base import Flow
from eqbench.flows.cnf import CNF
from eqbench.geometry import (  # com_free_basis: re-exported, it lived here first
    apply_permutation,
    com_free_basis,
    random_permutations,
    random_reflections,
    random_rotations,
    remove_com,
)
from eqbench.systems.base import ParticleSystem

__all__ = ["FlowCheckReport", "check_flow", "check_flow_quick", "com_free_basis"]


@dataclass
class FlowCheckReport:
    """What was checked and the largest deviations seen (useful to choose tolerances)."""

    model: str
    passed: list[str] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)


def _flat_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    shape = x.shape

    def flat(v: torch.Tensor) -> torch.Tensor:
        return fn(v.reshape(1, *shape[1:])).reshape(-1)

    return torch.autograd.functional.jacobian(flat, x.reshape(-1))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (1.0 + b.abs())).max())


def check_flow(
    build: Callable[[], Flow],
    system: ParticleSystem,
    *,
    batch: int = 6,
    seed: int = 0,
    roundtrip_tol: float = 1e-4,
    logdet_tol: float = 1e-4,
    density_tol: float = 1e-4,
    divergence_tol: float = 1e-8,
    symmetry_tol: float = 1e-6,
    broken_tol: float = 1e-3,
) -> FlowCheckReport:
    """Run the contract on a freshly built model (converted to float64); raise AssertionError on failure.

    ``build`` is called twice (the second instance tests the state_dict round trip).
    """
    torch.manual_seed(seed)
    flow = build().double()
    flow.eval()
    name = type(flow).__name__
    report = FlowCheckReport(model=name)
    gen = torch.Generator().manual_seed(seed)
    n, d = system.n_particles, system.n_dims
    augmented = getattr(flow, "com_augmented", False)
    dtype = torch.float64

    def ok(check: str, value: float | None = None) -> None:
        report.passed.append(check)
        if value is not None:
            report.measured[check] = value

    # 1-2. sampling: shapes, finiteness, CoM-free; sample and log_prob agree ------------------
    x, _ = _check_samples(flow, system, gen, batch, density_tol, ok)

    # 3. inverse(forward(z)) round trip -------------------------------------------------------
    z = torch.randn(batch, n, d, generator=gen, dtype=dtype)
    z = z if augmented else remove_com(z)
    with torch.no_grad():
        xz, logdet_f = flow.forward(z)
        z_back, logdet_i = flow.inverse(xz)
    dev = float((z_back - z).abs().max())
    assert dev < roundtrip_tol, f"{name}: inverse(forward(z)) deviates from z by {dev:.2e}"
    dev_ld = float((logdet_f + logdet_i).abs().max())
    assert dev_ld < logdet_tol, f"{name}: forward and inverse log-determinants do not cancel ({dev_ld:.2e})"
    ok("inverse_forward_round_trip", dev)

    # 4. log-determinant vs the brute-force Jacobian ----------------------------------------
    z1 = z[:1]
    # x = forward(z) does not depend on how the divergence is computed, only logdet does: take
    # the Jacobian of the map with the cheap estimator (39 brute-force passes per ODE step
    # would be differentiated 39 times more for LJ-13), and the logdet with the exact one.
    if isinstance(flow, CNF) and not flow.has_closed_form_divergence:
        jac = _flat_jacobian(lambda v: flow.forward(v, divergence="hutchinson")[0], z1)
    else:
        jac = _flat_jacobian(lambda v: flow.forward(v)[0], z1)
    if not augmented:
        basis = com_free_basis(n, d)
        jac = basis.T @ jac @ basis
    sign, brute = torch.linalg.slogdet(jac)
    with torch.no_grad():
        logdet = flow.forward(z1)[1][0]
    dev = abs(float(brute - logdet))
    assert sign > 0 and dev < logdet_tol, f"{name}: logdet {float(logdet):.6f} vs brute-force Jacobian {float(brute):.6f}"
    ok("logdet_vs_brute_force_jacobian", dev)

    # 5. CNF divergence vs the autograd trace ------------------------------------------------
    if hasattr(flow, "velocity") and hasattr(flow, "divergence"):
        for t in (0.0, 0.5, 1.0):
            xt = x[:2].clone()
            _, div = flow.divergence(t, xt, "exact")
            tt = torch.tensor(t, dtype=dtype)
            traces = torch.stack([torch.trace(_flat_jacobian(lambda v: flow.velocity(tt, v), xt[i:i + 1]))
                                  for i in range(xt.shape[0])])
            dev = _max_rel(div.detach(), traces)
            assert dev < divergence_tol, f"{name}: divergence at t={t} off the autograd trace by {dev:.2e}"
        ok("divergence_vs_autograd_trace", dev)

    # 6. symmetries: claimed ones hold, unclaimed rotation/permutation are broken -------------
    _check_symmetries(flow, system, z, gen, symmetry_tol, broken_tol, ok)

    # 7. every parameter gets a gradient of the training objective ---------------------------
    flow.train()
    flow.zero_grad(set_to_none=True)
    loss = -flow.training_log_prob(x.detach()).mean()
    loss.backward()
    missing = [p_name for p_name, p in flow.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or float(p.grad.abs().sum()) == 0.0)]
    assert not missing, f"{name}: parameters without a (finite, nonzero) gradient: {', '.join(missing)}"
    flow.eval()
    ok("every_parameter_gets_gradient")

    # 8. state_dict round trip ------------------------------------------------------------------
    twin = build().double()
    twin.load_state_dict(copy.deepcopy(flow.state_dict()))
    twin.eval()
    with torch.no_grad():
        a, _ = flow.forward(z)
        b, _ = twin.forward(z)
    assert torch.equal(a, b), f"{name}: a rebuilt model with the loaded state_dict maps z differently"
    ok("state_dict_round_trip")
    return report


def _check_samples(flow: Flow, system: ParticleSystem, gen: torch.Generator, batch: int, density_tol: float,
                   ok: Callable[..., None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples have the right shapes, are finite and CoM-free, and ``log_prob`` of them equals the
    log-density ``sample`` returned (on the extended space, CoM-augmented flows skip the latter)."""
    name = type(flow).__name__
    n, d = system.n_particles, system.n_dims
    with torch.no_grad():
        x, log_q = flow.sample(batch, generator=gen)
    assert x.shape == (batch, n, d), f"{name}: sample shape {tuple(x.shape)}, expected {(batch, n, d)}"
    assert log_q.shape == (batch,), f"{name}: log-density shape {tuple(log_q.shape)}, expected {(batch,)}"
    assert torch.isfinite(x).all() and torch.isfinite(log_q).all(), f"{name}: non-finite samples or densities"
    com = float(x.mean(dim=1).abs().max())
    assert com < 1e-8, f"{name}: samples are not CoM-free (max |CoM| {com:.2e})"
    ok("sample_shapes_finite_com_free", com)
    if not getattr(flow, "com_augmented", False):
        with torch.no_grad():
            log_p = flow.log_prob(x)
        dev = _max_rel(log_p, log_q)
        assert dev < density_tol, f"{name}: log_prob(sample) differs from sample's log-density by {dev:.2e}"
        ok("sample_log_prob_agree", dev)

    # 2b. the density does not depend on the module's mode (no estimator unless named) --------
    estimated = getattr(flow, "iw_draws", None) is not None
    xm = x[:2]

    def density() -> torch.Tensor:
        with torch.no_grad():
            if estimated:  # same draws in both modes
                return flow.log_prob(xm, generator=torch.Generator().manual_seed(0))
            return flow.log_prob(xm)

    eval_density = density()
    flow.train()
    try:
        train_density = density()
    finally:
        flow.eval()
    dev = _max_rel(train_density, eval_density)
    assert dev < 1e-10, f"{name}: log_prob in training mode differs from evaluation mode by {dev:.2e}"
    ok("log_prob_independent_of_mode", dev)
    return x, log_q


def _check_symmetries(flow: Flow, system: ParticleSystem, z: torch.Tensor, gen: torch.Generator,
                      symmetry_tol: float, broken_tol: float, ok: Callable[..., None]) -> None:
    """Each claimed symmetry holds under random group elements; unclaimed rotation and
    permutation are shown to be broken (a model that is secretly equivariant should say so)."""
    name = type(flow).__name__
    batch, n, d = z.shape
    claimed = set(getattr(flow, "symmetries", ()))
    rot = random_rotations(batch, d, generator=gen)
    ref = random_reflections(batch, d, generator=gen)
    perm = random_permutations(batch, n, generator=gen)
    shift = torch.randn(batch, 1, d, generator=gen, dtype=z.dtype) * 3.0
    transforms = {
        "rotation": lambda v: v @ rot.transpose(-1, -2),
        "reflection": lambda v: v @ ref.transpose(-1, -2),
        "permutation": lambda v: apply_permutation(v, perm),
    }
    with torch.no_grad():
        fz, ld = flow.forward(z)
        for sym, g in transforms.items():
            gz, gld = flow.forward(g(z))
            dev = float((gz - g(fz)).abs().max()) + float((gld - ld).abs().max())
            if sym in claimed:
                assert dev < symmetry_tol, f"{name}: claims {sym} equivariance but deviates by {dev:.2e}"
                ok(f"{sym}_equivariant", dev)
            elif sym in ("rotation", "permutation"):
                assert dev > broken_tol, f"{name}: does not claim {sym} equivariance but shows it ({dev:.2e})"
                ok(f"{sym}_not_equivariant", dev)
        if "translation" in claimed and not getattr(flow, "com_augmented", False):
            dev = float((flow.log_prob(fz + shift) - flow.log_prob(fz)).abs().max())
            assert dev < symmetry_tol * 100, f"{name}: claims translation invariance but log_prob changes by {dev:.2e}"
            ok("translation_invariant", dev)


def check_flow_quick(flow: Flow, system: ParticleSystem, *, batch: int = 2, seed: int = 0,
                     density_tol: float = 1e-4, symmetry_tol: float = 1e-6,
                     broken_tol: float = 1e-3) -> FlowCheckReport:
    """The cheap part of the contract, run on every model before its first cell is scored.

    Samples CoM-free, finite and of the right shape; ``sample`` and ``log_prob`` agree; every
    claimed symmetry holds (and unclaimed rotation/permutation are broken). Seconds, not the
    minutes of :func:`check_flow`'s brute-force Jacobians. Runs on a float64 copy in eval mode,
    so the caller's model is untouched. Raises AssertionError naming the broken property.

    Example:
        >>> import eqbench
        >>> system = eqbench.get_system("dw4")
        >>> check_flow_quick(eqbench.build_model("kernel-flow", system), system).passed[0]
        'sample_shapes_finite_com_free'
    """
    twin = copy.deepcopy(flow).double()
    twin.eval()
    if hasattr(twin, "with_solver"):
        # The properties checked here belong to the velocity field, and a fixed-grid RK4 solve of
        # an equivariant, CoM-preserving field has them at any step count: 4 steps keep the check
        # at seconds for the flows whose exact divergence costs one backward pass per coordinate.
        twin.with_solver(mode="dto", steps=min(4, twin.solver.steps))
    report = FlowCheckReport(model=type(flow).__name__)

    def ok(check: str, value: float | None = None) -> None:
        report.passed.append(check)
        if value is not None:
            report.measured[check] = value

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        _check_samples(twin, system, gen, batch, density_tol, ok)
        z = torch.randn(batch, system.n_particles, system.n_dims, generator=gen, dtype=torch.float64)
        z = z if getattr(twin, "com_augmented", False) else remove_com(z)
        _check_symmetries(twin, system, z, gen, symmetry_tol, broken_tol, ok)
    return report
