"""Public checkers for flow models: the contract every registered (or plugin) model must pass.

Use it in a plugin's own tests::

    from eqbench.testing import check_flow
    report = check_flow(lambda: my_build(system, {}), system)   # raises AssertionError on failure

The checks (DESIGN "Registry"; issue "Models"): finite shapes; samples CoM-free; ``sample`` and
``log_prob`` agree, and ``log_prob`` does not depend on the module's training mode (scores are
exact unless an estimator is asked for by name); ``sample_positions`` draws ``sample``'s
configurations with the same generator; ``inverse(forward(z)) ≈ z``; ``log|det|`` against the brute-force Jacobian;
for CNFs the divergence against the autograd trace; each *claimed* symmetry holds under random
rotations, reflections, permutations and translations, and each unclaimed one of rotation and
permutation is shown to be broken; every parameter gets a gradient of the training objective
(:meth:`~eqbench.flows.base.Flow.training_log_prob`); a state_dict round trip
reproduces the density. Tolerances are in float64 and leave room for the ODE discretisation
of the CNFs (DTO, 20 RK4 steps), which the exact checks (divergence, symmetries) do not need.

**Augmented flows** (``augmented = True``, :mod:`eqbench.flows.augmented`: a model of ``(x, a)``
whose ``log_prob(x)`` is an importance-weighted estimate) are checked on their joint space, where
they are exact: ``sample_joint`` gives CoM-free x, finite a and a log-density equal to
``log_prob_joint(x, a)``; ``sample`` returns the same x with ``log q(x, a) - log π(a | x)``;
``sample_aux`` and ``aux_log_prob`` have the documented shapes; the joint ``inverse(forward(z))``
round trip on states ``[B, 2N, D]`` (x rows, then a rows); the joint log-determinant against the
brute-force Jacobian on the joint space (the flow's ``joint_basis()``, default ``B_U ⊕ I`` on
``U × R^{N·D}``: x CoM-free, a unconstrained); each claimed symmetry of the joint map under the
same rotation, reflection or permutation of x and a (log-determinant invariant too), and
translation invariance of the joint density, the inverse and the estimate; gradients of
``training_log_prob``; state_dict round trip; and that the marginal estimate converges as K
grows: over repeated fixed draws, its mean does not decrease with K (within noise), the
increments shrink, and its spread across repeats shrinks (Burda et al. 2016, Theorem 1).
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

    def ok(self, check: str, value: float | None = None) -> None:
        """Record a passed check and, where there is one, the deviation it measured."""
        self.passed.append(check)
        if value is not None:
            self.measured[check] = value


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
    iw_draws: tuple[int, ...] = (1, 4, 16),
    iw_repeats: int = 4,
) -> FlowCheckReport:
    """Run the contract on a freshly built model (converted to float64); raise AssertionError on failure.

    ``build`` is called twice (the second instance tests the state_dict round trip). A flow with
    ``augmented = True`` (:class:`eqbench.flows.augmented.AugmentedFlow`) is checked on its joint
    space instead (:func:`_check_augmented_flow`); ``iw_draws`` (increasing Ks) and
    ``iw_repeats`` size its check that the importance-weighted marginal converges as K grows.
    """
    torch.manual_seed(seed)
    flow = build().double()
    flow.eval()
    name = type(flow).__name__
    report = FlowCheckReport(model=name)
    gen = torch.Generator().manual_seed(seed)
    if getattr(flow, "augmented", False):
        _check_augmented_flow(flow, build, system, report, batch=batch, seed=seed, roundtrip_tol=roundtrip_tol,
                              logdet_tol=logdet_tol, density_tol=density_tol, symmetry_tol=symmetry_tol,
                              broken_tol=broken_tol, iw_draws=iw_draws, iw_repeats=iw_repeats)
        return report
    n, d = system.n_particles, system.n_dims
    augmented = getattr(flow, "com_augmented", False)
    dtype = torch.float64

    ok = report.ok

    # 1-2. sampling: shapes, finiteness, CoM-free; sample and log_prob agree ------------------
    x, _ = _check_samples(flow, system, gen, batch, density_tol, ok)
    _check_sample_positions(flow, batch, seed, roundtrip_tol, ok)

    # 3. inverse(forward(z)) round trip -------------------------------------------------------
    z = torch.randn(batch, n, d, generator=gen, dtype=dtype)
    z = z if augmented else remove_com(z)
    _check_round_trip(flow, z, roundtrip_tol, logdet_tol, ok)

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
    _check_gradients(flow, x, ok)

    # 8. state_dict round trip ------------------------------------------------------------------
    _check_state_dict(flow, build, z, ok)
    return report


def _check_round_trip(flow: Flow, z: torch.Tensor, roundtrip_tol: float, logdet_tol: float,
                      ok: Callable[..., None], what: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``inverse(forward(z)) ≈ z`` and the two log-determinants cancel; returns ``forward(z)``."""
    name = type(flow).__name__
    with torch.no_grad():
        h, logdet_f = flow.forward(z)
        assert h.shape == z.shape, f"{name}: forward maps {what}states {tuple(z.shape)} to {tuple(h.shape)}"
        z_back, logdet_i = flow.inverse(h)
    dev = float((z_back - z).abs().max())
    assert dev < roundtrip_tol, f"{name}: {what}inverse(forward(z)) deviates from z by {dev:.2e}"
    dev_ld = float((logdet_f + logdet_i).abs().max())
    assert dev_ld < logdet_tol, f"{name}: {what}forward and inverse log-determinants do not cancel ({dev_ld:.2e})"
    ok("inverse_forward_round_trip", dev)
    return h, logdet_f


def _check_gradients(flow: Flow, x: torch.Tensor, ok: Callable[..., None]) -> None:
    """Every parameter gets a finite, nonzero gradient of the training objective."""
    flow.train()
    flow.zero_grad(set_to_none=True)
    loss = -flow.training_log_prob(x.detach()).mean()
    loss.backward()
    missing = [p_name for p_name, p in flow.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or float(p.grad.abs().sum()) == 0.0)]
    assert not missing, f"{type(flow).__name__}: parameters without a (finite, nonzero) gradient: {', '.join(missing)}"
    flow.eval()
    ok("every_parameter_gets_gradient")


def _check_state_dict(flow: Flow, build: Callable[[], Flow], z: torch.Tensor, ok: Callable[..., None]) -> None:
    """A rebuilt model with the loaded state_dict maps ``z`` exactly as ``flow`` does."""
    twin = build().double()
    twin.load_state_dict(copy.deepcopy(flow.state_dict()))
    twin.eval()
    with torch.no_grad():
        a, _ = flow.forward(z)
        b, _ = twin.forward(z)
    assert torch.equal(a, b), f"{type(flow).__name__}: a rebuilt model with the loaded state_dict maps z differently"
    ok("state_dict_round_trip")


def _check_mode_independence(flow: Flow, x: torch.Tensor, ok: Callable[..., None]) -> None:
    """``log_prob`` is the same in training and evaluation mode (no estimator unless named); an
    importance-weighted estimate gets the same draws in both."""
    estimated = getattr(flow, "iw_draws", None) is not None

    def density() -> torch.Tensor:
        with torch.no_grad():
            if estimated:  # same draws in both modes
                return flow.log_prob(x, generator=torch.Generator().manual_seed(0))
            return flow.log_prob(x)

    eval_density = density()
    flow.train()
    try:
        train_density = density()
    finally:
        flow.eval()
    dev = _max_rel(train_density, eval_density)
    assert dev < 1e-10, f"{type(flow).__name__}: log_prob in training mode differs from evaluation mode by {dev:.2e}"
    ok("log_prob_independent_of_mode", dev)


def _check_equivariance(flow: Flow, z: torch.Tensor, transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                        symmetry_tol: float, broken_tol: float, ok: Callable[..., None],
                        what: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Each claimed symmetry of ``transforms`` holds for ``forward`` (and leaves the log-determinant
    unchanged); unclaimed rotation and permutation are broken. Returns ``forward(z)``."""
    name = type(flow).__name__
    claimed = set(getattr(flow, "symmetries", ()))
    with torch.no_grad():
        fz, ld = flow.forward(z)
        for sym, g in transforms.items():
            gz, gld = flow.forward(g(z))
            dev = float((gz - g(fz)).abs().max()) + float((gld - ld).abs().max())
            if sym in claimed:
                assert dev < symmetry_tol, f"{name}: claims {sym} equivariance{what} but deviates by {dev:.2e}"
                ok(f"{sym}_equivariant", dev)
            elif sym in ("rotation", "permutation"):
                assert dev > broken_tol, f"{name}: does not claim {sym} equivariance but shows it ({dev:.2e})"
                ok(f"{sym}_not_equivariant", dev)
    return fz, ld


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
    _check_mode_independence(flow, x[:2], ok)
    return x, log_q


def _check_sample_positions(flow: Flow, batch: int, seed: int, tol: float, ok: Callable[..., None]) -> None:
    """``sample_positions`` (the configurations without ``log q``, used by metrics that never weight
    them) draws what ``sample`` draws with an equally seeded generator: a model that overrides it to
    skip its density must not change the samples the benchmark scores."""
    name = type(flow).__name__
    with torch.no_grad():
        x_ref, _ = flow.sample(batch, generator=torch.Generator().manual_seed(seed))
        x = flow.sample_positions(batch, generator=torch.Generator().manual_seed(seed))
    assert x.shape == x_ref.shape, f"{name}: sample_positions shape {tuple(x.shape)}, sample's {tuple(x_ref.shape)}"
    dev = _max_rel(x, x_ref)
    assert dev < tol, f"{name}: sample_positions differs from sample's configurations by {dev:.2e}"
    ok("sample_positions_match_sample", dev)


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
    fz, _ = _check_equivariance(flow, z, transforms, symmetry_tol, broken_tol, ok)
    with torch.no_grad():
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

    ok = report.ok

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if getattr(twin, "augmented", False):
            _check_augmented_samples(twin, system, seed, batch, density_tol, ok)
            _check_joint_symmetries(twin, system, _joint_base_states(twin, system, batch, gen), gen,
                                    symmetry_tol, broken_tol, ok)
            return report
        _check_samples(twin, system, gen, batch, density_tol, ok)
        _check_sample_positions(twin, batch, seed, density_tol, ok)
        z = torch.randn(batch, system.n_particles, system.n_dims, generator=gen, dtype=torch.float64)
        z = z if getattr(twin, "com_augmented", False) else remove_com(z)
        _check_symmetries(twin, system, z, gen, symmetry_tol, broken_tol, ok)
    return report


# ---------------------------------------------------------------------------- augmented flows
def _joint_base_states(flow: Flow, system: ParticleSystem, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Joint base states ``[B, 2N, D]`` in the flow's joint space (:func:`_joint_basis`): x rows
    drawn from a standard normal, a rows near them, projected onto the space."""
    n, d = system.n_particles, system.n_dims
    zx = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    za = zx + 0.5 * torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    basis = _joint_basis(flow, n, d)
    flat = torch.cat((zx, za), dim=1).reshape(batch, -1)
    return (flat @ basis @ basis.T).reshape(batch, 2 * n, d)


def _joint_basis(flow: Flow, n: int, d: int) -> torch.Tensor:
    """Orthonormal basis of the joint space: the flow's ``joint_basis()``
    (:meth:`eqbench.flows.augmented.AugmentedFlow.joint_basis`), else ``B_U ⊕ I``
    ``[2N·D, (2N-1)·D]`` (x CoM-free, a unconstrained)."""
    if hasattr(flow, "joint_basis"):
        return flow.joint_basis(torch.float64)
    return torch.block_diag(com_free_basis(n, d), torch.eye(n * d, dtype=torch.float64))


def _check_augmented_samples(flow: Flow, system: ParticleSystem, seed: int, batch: int, density_tol: float,
                             ok: Callable[..., None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint samples: shapes, finite, x CoM-free, exact joint density; ``sample`` is the same draw
    with ``log q(x, a) - log π(a | x)``; aux shapes; ``log_prob`` does not depend on the mode."""
    name = type(flow).__name__
    n, d = system.n_particles, system.n_dims
    with torch.no_grad():
        x, a, log_q = flow.sample_joint(batch, generator=torch.Generator().manual_seed(seed))
    assert x.shape == (batch, n, d) and a.shape == (batch, n, d), \
        f"{name}: sample_joint shapes {tuple(x.shape)}, {tuple(a.shape)}, expected {(batch, n, d)} twice"
    assert log_q.shape == (batch,), f"{name}: joint log-density shape {tuple(log_q.shape)}, expected {(batch,)}"
    assert torch.isfinite(x).all() and torch.isfinite(a).all() and torch.isfinite(log_q).all(), \
        f"{name}: non-finite joint samples or densities"
    com = float(x.mean(dim=1).abs().max())
    assert com < 1e-8, f"{name}: samples are not CoM-free (max |CoM| {com:.2e})"
    ok("sample_shapes_finite_com_free", com)
    with torch.no_grad():
        log_joint = flow.log_prob_joint(x, a)
    dev = _max_rel(log_joint, log_q)
    assert dev < density_tol, f"{name}: log_prob_joint(sample_joint) differs from its log-density by {dev:.2e}"
    ok("sample_joint_log_prob_joint_agree", dev)

    with torch.no_grad():
        xs, log_s = flow.sample(batch, generator=torch.Generator().manual_seed(seed))
        aux = flow.aux_log_prob(a, x)
        draws = flow.sample_aux(x, 3, generator=torch.Generator().manual_seed(seed))
    assert aux.shape == (batch,), f"{name}: aux_log_prob shape {tuple(aux.shape)}, expected {(batch,)}"
    assert draws.shape == (3, batch, n, d), f"{name}: sample_aux(x, 3) shape {tuple(draws.shape)}, " \
                                             f"expected {(3, batch, n, d)}"
    assert xs.shape == (batch, n, d) and log_s.shape == (batch,), f"{name}: sample shapes {tuple(xs.shape)}, " \
                                                                   f"{tuple(log_s.shape)}"
    dev_x = float((xs - x).abs().max())
    dev = _max_rel(log_s, log_q - aux)
    assert dev_x < 1e-10 and dev < density_tol, \
        f"{name}: sample() must return sample_joint's x with log q(x, a) - log π(a|x) (x off by {dev_x:.2e}, " \
        f"log-density by {dev:.2e})"
    ok("sample_is_joint_minus_aux", dev)
    _check_sample_positions(flow, batch, seed, density_tol, ok)

    _check_mode_independence(flow, x[:2], ok)
    return x, a


def _check_joint_symmetries(flow: Flow, system: ParticleSystem, z: torch.Tensor, gen: torch.Generator,
                            symmetry_tol: float, broken_tol: float, ok: Callable[..., None]) -> None:
    """Claimed symmetries of the joint map hold when x and a are transformed alike (unclaimed
    rotation/permutation are broken); a claimed translation leaves the joint density, the
    inverse and the marginal estimate (fixed draws) unchanged when x and a move together."""
    name = type(flow).__name__
    batch, n, d = z.shape[0], system.n_particles, system.n_dims
    claimed = set(getattr(flow, "symmetries", ()))
    rot = random_rotations(batch, d, generator=gen)
    ref = random_reflections(batch, d, generator=gen)
    perm = random_permutations(batch, n, generator=gen)
    joint_perm = torch.cat((perm, perm + n), dim=1)
    transforms = {
        "rotation": lambda v: v @ rot.transpose(-1, -2),
        "reflection": lambda v: v @ ref.transpose(-1, -2),
        "permutation": lambda v: apply_permutation(v, joint_perm),
    }
    fz, _ = _check_equivariance(flow, z, transforms, symmetry_tol, broken_tol, ok, " of the joint map")
    with torch.no_grad():
        if "translation" in claimed:
            shift = torch.randn(batch, 1, d, generator=gen, dtype=z.dtype) * 3.0
            x, a = fz[:, :n], fz[:, n:]
            dev = float((flow.log_prob_joint(x + shift, a + shift) - flow.log_prob_joint(x, a)).abs().max())
            zt, ldt = flow.inverse(fz + shift)
            zb, ldb = flow.inverse(fz)
            dev += float((zt - zb).abs().max()) + float((ldt - ldb).abs().max())
            est = [flow.log_prob(v, generator=torch.Generator().manual_seed(1)) for v in (x + shift, x)]
            dev += float((est[0] - est[1]).abs().max())
            assert dev < symmetry_tol * 100, f"{name}: claims translation invariance but the joint density, inverse " \
                                             f"or estimate changes by {dev:.2e}"
            ok("translation_invariant", dev)


def _check_iw_convergence(flow: Flow, x: torch.Tensor, draws: tuple[int, ...], repeats: int, seed: int,
                          ok: Callable[..., None]) -> None:
    """The IW estimate converges as K grows (Burda et al. 2016): its mean over ``repeats`` fixed
    draws does not decrease with K and its increments shrink (within 4 standard errors), and its
    spread across repeats (pooled over configurations) does not grow from the first K to the last."""
    name = type(flow).__name__
    means, spreads, errors = [], [], []
    with torch.no_grad():
        for k in draws:
            est = torch.stack([flow.log_prob(x, iw_draws=k, generator=torch.Generator().manual_seed(seed + 1000 * r))
                               for r in range(repeats)])                       # [repeats, configs]
            assert torch.isfinite(est).all(), f"{name}: non-finite IW estimate with K={k}"
            centred = est - est.mean(dim=0)
            spread = float(centred.pow(2).sum() / (est.numel() - est.shape[1])) ** 0.5
            means.append(float(est.mean()))
            spreads.append(spread)
            errors.append(spread / est.numel() ** 0.5)
    for j in range(len(draws) - 1):
        noise = 4.0 * (errors[j] ** 2 + errors[j + 1] ** 2) ** 0.5 + 1e-9 * (1.0 + abs(means[j]))
        assert means[j + 1] > means[j] - noise, \
            f"{name}: mean IW estimate falls from K={draws[j]} ({means[j]:.6f}) to K={draws[j + 1]} ({means[j + 1]:.6f})"
    if len(draws) >= 3:
        first, last = means[1] - means[0], means[-1] - means[-2]
        noise = 4.0 * sum(e ** 2 for e in (errors[0], errors[1], errors[-2], errors[-1])) ** 0.5 + 1e-9
        assert last < first + noise, f"{name}: IW estimate does not settle: the increment {last:.3e} of the last K " \
                                     f"exceeds the first {first:.3e}"
    assert spreads[-1] <= spreads[0] * 1.05 + 1e-9, \
        f"{name}: the IW estimate's spread grows with K ({spreads[0]:.3e} at K={draws[0]}, " \
        f"{spreads[-1]:.3e} at K={draws[-1]})"
    ok("iw_estimate_converges_with_k", means[-1] - means[0])
    ok("iw_spread_shrinks_with_k", spreads[-1] / spreads[0] if spreads[0] > 0 else 0.0)


def _check_augmented_flow(flow: Flow, build: Callable[[], Flow], system: ParticleSystem, report: FlowCheckReport, *,
                          batch: int, seed: int, roundtrip_tol: float, logdet_tol: float, density_tol: float,
                          symmetry_tol: float, broken_tol: float, iw_draws: tuple[int, ...],
                          iw_repeats: int) -> None:
    """:func:`check_flow` for ``augmented = True`` flows (module docstring, "Augmented flows")."""
    name = type(flow).__name__
    n, d = system.n_particles, system.n_dims
    gen = torch.Generator().manual_seed(seed)

    ok = report.ok

    x, _ = _check_augmented_samples(flow, system, seed, batch, density_tol, ok)

    z = _joint_base_states(flow, system, batch, gen)
    _, logdet_f = _check_round_trip(flow, z, roundtrip_tol, logdet_tol, ok, "joint ")

    basis = _joint_basis(flow, n, d)
    jac = basis.T @ _flat_jacobian(lambda v: flow.forward(v)[0], z[:1]) @ basis
    sign, brute = torch.linalg.slogdet(jac)
    dev = abs(float(brute - logdet_f[0]))
    assert sign > 0 and dev < logdet_tol, \
        f"{name}: joint logdet {float(logdet_f[0]):.6f} vs brute-force Jacobian on U x R^(N·D) {float(brute):.6f}"
    ok("logdet_vs_brute_force_jacobian", dev)

    _check_joint_symmetries(flow, system, z, gen, symmetry_tol, broken_tol, ok)

    _check_gradients(flow, x, ok)
    _check_state_dict(flow, build, z, ok)

    _check_iw_convergence(flow, x[:3], tuple(iw_draws), iw_repeats, seed, ok)
