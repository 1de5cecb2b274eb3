"""One training loop for every model: maximum likelihood, reverse KL, and their λ-mix (paper §2).

``L = (1 - λ) L_ML + λ L_KL`` with ``L_ML = -⟨log q(x)⟩_data`` and
``L_KL = ⟨u(x) + log q(x)⟩_{x~q}`` (reverse KL up to the constant log Z). λ follows a linear
schedule from ``lambda_start`` to ``lambda_end`` (paper B.3: 0 → 0.5 after ML pre-training).
Defaults are the paper's protocol: AdamW, lr 5e-3, weight decay 0.01, batch 64 (C.1, C.3), no
gradient clipping, a constant learning rate. Optimiser (AdamW or Adam), clipping (a fixed norm, or
``"dynamic"``: the coupling-flow authors' median-based clip-and-skip guard,
:mod:`eqbench.grad_guard`), and a cosine schedule with linear warm-up are settings (:data:`eqbench.config.TRAINING_DEFAULTS`), because a
flow brought from elsewhere may need its own: one step at a learning rate it was not made for
can undo its training. Data augmentation
(random rotation/reflection and permutation of each batch) is an option for any model (the
``aug`` variants of paper §7.3). A non-finite loss or gradient stops the run with the reason
recorded, never silently continuing on garbage. Deterministic on CPU given ``seed``.

Both terms use the model's *training* estimator, named explicitly
(:meth:`~eqbench.flows.base.Flow.training_log_prob`, :meth:`~eqbench.flows.base.Flow.training_sample`):
one Hutchinson probe for the CNFs without closed-form trace (paper §7.3), one CoM draw for real
NVP (B.2), the exact density otherwise. ``flow.log_prob`` itself is exact in either module mode,
so the loss history is a training estimator and never a score.

Energy of the KL term (``kl_energy_cut``): the paper uses the raw energy. A flow sample with two
Lennard-Jones particles nearly on top of each other has u ~ 1e17 kT and a gradient beyond float32
(the r⁻¹³ wall), so the first λ-mix step of an LJ-55 flow stops the run (measured for the kernel
flow and real NVP after ML pre-training). ``kl_energy_cut = u_high`` uses the Boltzmann
generators' regularised energy instead (Noé et al. 2019; bgflow's ``LinLogCutEnergy``, default
u_high = 1,000 kT): u above u_high grows as u_high + log(1 + u - u_high), evaluated in float64
so that the chain rule meets the huge gradient at double range. It changes the training target
above u_high only; every score and reweighting uses the raw energy.

Memory (``micro_batch``): a CNF trained discretise-then-optimise keeps the graph of every solver
evaluation for the backward pass, so one batch of 64 LJ-13 configurations through ``en-flow``
holds 12-17 GB. ``micro_batch = m`` runs the backward pass on chunks of at most m rows (of the
data batch and of the reverse-KL samples) and adds their gradients, each chunk's term weighted
by its share of the batch: the gradient of the same loss, at about m/64 of the memory. It
changes no expectation, but not bit for bit (another summation order; one fresh Hutchinson probe
or CoM draw per chunk), so it is a recorded setting. A model's training penalty is taken after
each chunk of the last term computed, weighted by the chunk's share.

Model selection (``selection``): scoring whatever the last iteration left is a lottery when the
test NLL of a flow trained on few samples swings by tens of nats between checkpoints (measured:
the kernel flow on 10 LJ-13 samples, 41.0 / 76.6 / 42.8 / 39.3 / 33.8 / 33.3 every 100
iterations). With a ``validation`` set (the reference pool's validation split, disjoint from
train and test), :func:`fit` scores the exact NLL on it every ``validate_every`` iterations and,
with ``selection="best-validation"``, restores the parameters of the best one at the end, as the
E(n)-equivariant-flow protocol does. ``"last"`` keeps the last iteration (the paper's text).

Snapshots (``snapshot``): with a :class:`~eqbench.snapshots.SnapshotSlot`, :func:`fit` saves its
whole state every ``every_s`` seconds and resumes from it when called again with the same
settings and data, so a killed run continues bit for bit (:mod:`eqbench.snapshots`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from eqbench.config import OPTIMIZERS, SCHEDULES
from eqbench.errors import ConfigError
from eqbench.flows.base import Flow
from eqbench.grad_guard import GRAD_GUARD_SETTING, GradientGuard
from eqbench.geometry import apply_permutation, random_orthogonal, random_permutations
from eqbench.snapshots import SnapshotSlot, fingerprint, load_snapshot, save_snapshot
from eqbench.systems.base import ParticleSystem

__all__ = ["SELECTIONS", "TrainConfig", "TrainResult", "augment", "fit", "kl_energy", "lambda_at", "lr_factor",
           "mean_nll"]

#: How :func:`fit` picks the parameters it returns: the last iteration's, or those with the
#: lowest exact validation NLL among the checkpoints it scored.
SELECTIONS = ("last", "best-validation")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :func:`fit` (defaults: paper C.1/C.3)."""

    iterations: int = 1000
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 0.01
    lambda_start: float = 0.0
    lambda_end: float = 0.0
    kl_batch_size: int = 64
    augment: bool = False
    #: Largest gradient norm, ``"dynamic"`` (the coupling-flow authors' guard,
    #: :mod:`eqbench.grad_guard`), or ``None``: no clipping (the paper's protocol).
    grad_clip: float | str | None = None
    #: u_high of the KL term's regularised energy (:func:`kl_energy`), or ``None``: the raw
    #: energy (the paper's protocol).
    kl_energy_cut: float | None = None
    optimizer: str = "adamw"
    schedule: str = "constant"
    #: Iterations of linear warm-up from lr 0 before the schedule.
    lr_warmup: int = 0
    #: Rows per backward pass, or ``None``: the whole batch in one pass (module docstring).
    micro_batch: int | None = None
    seed: int = 0
    log_every: int = 10
    selection: str = "last"
    validate_every: int = 50

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown model selection {self.selection!r}; valid: {', '.join(SELECTIONS)}")
        for name in ("iterations", "batch_size", "kl_batch_size", "log_every", "validate_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lambda_start", "lambda_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip != GRAD_GUARD_SETTING and not (
                not isinstance(self.grad_clip, str) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be None (off), {GRAD_GUARD_SETTING!r} or > 0, got {self.grad_clip!r}")
        if self.kl_energy_cut is not None and not math.isfinite(self.kl_energy_cut):
            raise ConfigError(f"kl_energy_cut must be None (off) or a finite energy in kT, got {self.kl_energy_cut}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.lr_warmup < 0:
            raise ConfigError(f"lr_warmup must be >= 0, got {self.lr_warmup}")
        if self.micro_batch is not None and (isinstance(self.micro_batch, bool) or self.micro_batch < 1):
            raise ConfigError(f"micro_batch must be None (off) or a positive integer, got {self.micro_batch}")


@dataclass
class TrainResult:
    """Outcome of :func:`fit`: ``status`` is ``"ok"`` or ``"failed"`` with ``reason``."""

    status: str
    reason: str
    iterations_done: int
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: ``(iterations done, exact validation NLL)`` at every checkpoint scored (0 = before training).
    validation: list[tuple[int, float]] = field(default_factory=list)
    #: Iterations done by the parameters returned (``iterations_done`` unless selection restored
    #: an earlier checkpoint).
    selected_iteration: int = 0
    #: Seconds spent scoring the validation set (not included in ``wall_s``).
    validation_wall_s: float = 0.0
    #: Iterations already done by the snapshot this fit resumed from (:mod:`eqbench.snapshots`),
    #: or ``None``: it ran from the start. ``wall_s`` then counts the training of every run.
    resumed_from_iteration: int | None = None
    #: Wall-clock seconds (training and validation) this fit spent in the earlier runs it resumed
    #: from: what a caller timing the call adds to say how long the training took.
    earlier_wall_s: float = 0.0
    #: Steps the gradient guard did not apply (``grad_clip="dynamic"``), or ``None``: no guard.
    skipped_steps: int | None = None


def kl_energy(system: ParticleSystem, samples: torch.Tensor, cut: float | None = None) -> torch.Tensor:
    """The energy the reverse-KL term of :func:`fit` uses: ``system.energy(samples)`` (``cut``
    None, the paper), or above ``cut`` = u_high the regularised u_high + log(1 + u - u_high) of
    Boltzmann generators (Noé et al. 2019), computed in float64 and returned in the samples' dtype.

    Why float64: the raw energy of overlapping Lennard-Jones particles fits float32, its gradient
    (r⁻¹³) does not; the cut's factor 1/(1 + u - u_high) brings it back into range only if the
    product is formed in double precision.

    Example:
        >>> import torch
        >>> from eqbench.components import get_system
        >>> lj = get_system("lj13")
        >>> x = 2.0 * torch.randn(2, 13, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> x[1, 1] = x[1, 0] + 1e-3                    # two particles almost on top of each other
        >>> raw, regularised = lj.energy(x), kl_energy(lj, x, cut=1000.0)
        >>> [f"{u:.3g}" for u in raw.tolist()], [round(u, 2) for u in regularised.tolist()]
        (['1.59e+04', '2.74e+33'], [1009.61, 1076.99])
    """
    if cut is None:
        return system.energy(samples)
    u = system.energy(samples.to(torch.float64))
    excess = (u - cut).clamp(min=0.0)  # ≥ 0, so neither branch's gradient is NaN
    return torch.where(u > cut, cut + torch.log1p(excess), u).to(samples.dtype)


def lambda_at(config: TrainConfig, iteration: int) -> float:
    """Linear λ schedule from ``lambda_start`` (first iteration) to ``lambda_end`` (last)."""
    if config.iterations == 1:
        return config.lambda_end
    fraction = iteration / (config.iterations - 1)
    return config.lambda_start + fraction * (config.lambda_end - config.lambda_start)


def lr_factor(config: TrainConfig, iteration: int) -> float:
    """The learning rate of ``iteration`` (0-based) as a fraction of ``config.lr``.

    Linear warm-up over the first ``lr_warmup`` iterations (iteration ``i`` gets ``(i + 1) /
    lr_warmup``, so no step is taken at lr 0), then constant, or a cosine decay that reaches 0
    after the last iteration.

    Example:
        >>> cfg = TrainConfig(iterations=10, schedule="cosine", lr_warmup=2)
        >>> [round(lr_factor(cfg, i), 3) for i in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.038]
    """
    if iteration < config.lr_warmup:
        return (iteration + 1) / config.lr_warmup
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.iterations - config.lr_warmup)
    progress = (iteration - config.lr_warmup) / span
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(flow: Flow, config: TrainConfig) -> torch.optim.Optimizer:
    kind = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[config.optimizer]
    return kind(flow.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply an independent random element of O(D) and a random permutation to each configuration."""
    q = random_orthogonal(x.shape[0], x.shape[-1], generator=generator, dtype=x.dtype).to(x.device)
    perm = random_permutations(x.shape[0], x.shape[-2], generator=generator)
    return apply_permutation(x @ q.transpose(-1, -2), perm)


def _grad_norm(flow: Flow) -> float:
    total = 0.0
    for p in flow.parameters():
        if p.grad is not None:
            total += float(p.grad.detach().pow(2).sum())
    return math.sqrt(total)


_Terms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _whole_batch_backward(flow: Flow, system: ParticleSystem, config: TrainConfig, lam: float,
                          batch: torch.Tensor | None) -> _Terms:
    """One pass over the whole batch and one backward pass of ``(1 - λ) NLL + λ KL (+ penalty)``;
    returns ``(loss, nll, kl, penalty)``. Skips the backward pass when the loss is not finite."""
    ref = next(flow.parameters())
    nll = kl = torch.zeros((), dtype=ref.dtype, device=ref.device)
    if batch is not None:
        nll = -flow.training_log_prob(batch).mean()
    if lam > 0.0:
        samples, log_q = flow.training_sample(config.kl_batch_size)
        kl = (kl_energy(system, samples, config.kl_energy_cut) + log_q).mean()
    loss = (1.0 - lam) * nll + lam * kl
    penalty = flow.training_penalty()
    if penalty is not None:
        loss = loss + penalty
    if torch.isfinite(loss):
        loss.backward()
    return loss.detach(), nll.detach(), kl.detach(), None if penalty is None else penalty.detach()


def _chunked_backward(flow: Flow, system: ParticleSystem, config: TrainConfig, lam: float,
                      batch: torch.Tensor | None) -> _Terms:
    """:func:`_whole_batch_backward` with one backward pass per chunk of ``config.micro_batch``
    rows, each term weighted by its chunk's share, so the gradients add up to the same loss's."""
    ref = next(flow.parameters())
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    nll, kl, penalty_total = zero, zero, None
    size = config.micro_batch
    last_term = "kl" if lam > 0.0 else "nll"

    def backward(term: torch.Tensor, weight: float, share: float, which: str) -> torch.Tensor:
        nonlocal penalty_total
        piece = weight * term
        penalty = flow.training_penalty()
        if penalty is not None and which == last_term:
            piece = piece + share * penalty
            penalty_total = (0.0 if penalty_total is None else penalty_total) + share * penalty.detach()
        if torch.isfinite(piece):
            piece.backward()
        return term.detach()

    if batch is not None:
        for part in batch.split(size):
            share = len(part) / len(batch)
            nll = nll + backward(-flow.training_log_prob(part).sum() / len(batch), 1.0 - lam, share, "nll")
            if not torch.isfinite(nll):
                break
    if lam > 0.0 and torch.isfinite(nll):
        left = config.kl_batch_size
        while left > 0 and torch.isfinite(kl):
            n = min(size, left)
            samples, log_q = flow.training_sample(n)
            term = (kl_energy(system, samples, config.kl_energy_cut) + log_q).sum() / config.kl_batch_size
            kl = kl + backward(term, lam, n / config.kl_batch_size, "kl")
            left -= n
    loss = (1.0 - lam) * nll + lam * kl + (0.0 if penalty_total is None else penalty_total)
    return loss, nll, kl, penalty_total


def fit(
    flow: Flow,
    system: ParticleSystem,
    data: torch.Tensor | None,
    config: TrainConfig,
    *,
    progress: bool | None = None,
    validation: torch.Tensor | None = None,
    snapshot: SnapshotSlot | None = None,
) -> TrainResult:
    """Train ``flow`` in place; returns a :class:`TrainResult` (never raises on divergence).

    ``validation``: configurations whose exact mean NLL is recorded before training, every
    ``config.validate_every`` iterations and after the last; needed by
    ``selection="best-validation"``, which then returns the best checkpoint's parameters.
    ``snapshot``: where to save the training state every ``snapshot.every_s`` seconds, and to
    resume from if an earlier run of the same fit left one (module docstring).

    Example:
        >>> import eqbench
        >>> system = eqbench.get_system("dw2")
        >>> flow = eqbench.build_model("kernel-flow", system)
        >>> x = torch.randn(32, 2, 2) * 2; x = x - x.mean(1, keepdim=True)
        >>> cfg = TrainConfig(iterations=4, batch_size=8, selection="best-validation", validate_every=2)
        >>> result = fit(flow, system, x[:16], cfg, validation=x[16:], progress=False)
        >>> [step for step, _ in result.validation], result.selected_iteration in (0, 2, 4)
        ([0, 2, 4], True)
    """
    if config.selection == "best-validation" and (validation is None or len(validation) == 0):
        raise ConfigError("selection 'best-validation' needs validation configurations")
    needs_data = config.lambda_start < 1.0 or config.lambda_end < 1.0
    if needs_data and (data is None or len(data) == 0):
        raise ConfigError("maximum-likelihood training (λ < 1) needs training data")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    ref = next(flow.parameters())
    if data is not None:
        data = data.to(device=ref.device, dtype=ref.dtype)
    optimizer = _optimizer(flow, config)
    guard = GradientGuard.authors() if config.grad_clip == GRAD_GUARD_SETTING else None
    if validation is not None:
        validation = validation.to(device=ref.device, dtype=ref.dtype)
    key = fingerprint(asdict(config), data, validation) if snapshot is not None else ""
    saved = load_snapshot(snapshot.path, key) if snapshot is not None else None
    if saved is not None and saved["final"]:  # this fit finished in an earlier run: its outcome
        flow.load_state_dict(saved["flow"])
        _set_random_state(saved["random"], ref.device)
        flow.eval()
        done_before: TrainResult = saved["result"]
        return replace(done_before, resumed_from_iteration=done_before.iterations_done,
                       earlier_wall_s=done_before.wall_s + done_before.validation_wall_s)
    scores: list[tuple[int, float]] = []
    validation_wall = [0.0]
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def checkpoint(done_so_far: int) -> None:
        nonlocal best
        if validation is None:
            return
        tick = time.perf_counter()
        # An importance-weighted density gets fixed draws, so checkpoints differ by the model only.
        draws = {"generator": torch.Generator(device=ref.device).manual_seed(config.seed)} \
            if getattr(flow, "iw_draws", None) else {}
        value = mean_nll(flow, validation, **draws)
        validation_wall[0] += time.perf_counter() - tick
        scores.append((done_so_far, value))
        if config.selection == "best-validation" and math.isfinite(value) and (best is None or value < best[0]):
            best = (value, done_so_far, {k: v.detach().clone() for k, v in flow.state_dict().items()})

    start = time.perf_counter()
    history: list[dict[str, float]] = []
    status, reason, done, earlier_s, resumed_from = "ok", "", 0, 0.0, None
    if saved is not None:  # an earlier run stopped mid-training: continue exactly where it was
        flow.load_state_dict(saved["flow"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        _set_random_state(saved["random"], ref.device)
        history, scores, best = saved["history"], saved["validation"], saved["best"]
        if guard is not None:
            guard.load_state_dict(saved["guard"])
        validation_wall[0], done, earlier_s = saved["validation_wall_s"], saved["done"], saved["elapsed_s"]
        resumed_from = done
    else:
        checkpoint(0)
    last_saved, wrote = start, False

    def elapsed() -> float:
        return earlier_s + time.perf_counter() - start

    def state(final: bool) -> dict[str, Any]:
        common = {"fingerprint": key, "final": final, "flow": flow.state_dict(),
                  "random": _random_state(ref.device)}
        if final:
            return {**common, "result": result}
        return {**common, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "history": history, "validation": scores, "best": best, "validation_wall_s": validation_wall[0],
                "done": done, "elapsed_s": elapsed(), "guard": None if guard is None else guard.state_dict()}

    flow.train()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(done, config.iterations), desc=f"train {type(flow).__name__}", disable=not show, leave=False,
               initial=done, total=config.iterations)
    for iteration in bar:
        lam = lambda_at(config, iteration)
        nfe_before = getattr(flow, "nfe", 0)
        batch = None
        if lam < 1.0:
            idx = torch.randint(len(data), (config.batch_size,), generator=generator)
            batch = data[idx.to(data.device)]
            if config.augment:
                batch = augment(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        step = _whole_batch_backward if config.micro_batch is None else _chunked_backward
        loss, nll, kl, penalty = step(flow, system, config, lam, batch)
        if not torch.isfinite(loss):
            status = "failed"
            reason = f"non-finite loss at iteration {iteration} (nll={nll.item():.4g}, kl={kl.item():.4g}, λ={lam:.3f})"
            break
        grad_norm = _grad_norm(flow)
        if not math.isfinite(grad_norm):
            status, reason = "failed", f"non-finite gradient at iteration {iteration} (loss={loss.item():.4g})"
            break
        skip = False
        if guard is not None:
            decision = guard.admit(grad_norm)
            skip = decision.skip
            if not skip and grad_norm > decision.limit:
                torch.nn.utils.clip_grad_norm_(flow.parameters(), decision.limit)
        elif config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(flow.parameters(), config.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, iteration)
        if not skip:
            optimizer.step()
        done = iteration + 1
        if iteration % config.log_every == 0 or done == config.iterations:
            entry = {"iteration": iteration, "loss": loss.item(), "nll": nll.item(), "kl": kl.item(),
                     **({} if penalty is None else {"penalty": penalty.item()}),
                     "lambda": lam, "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"],
                     "nfe": float(getattr(flow, "nfe", 0) - nfe_before),  # forward + backward, this iteration
                     **({} if guard is None else {"skipped_steps": float(guard.skipped)}),
                     "wall_s": elapsed()}
            history.append(entry)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if validation is not None and (done % config.validate_every == 0 or done == config.iterations):
            checkpoint(done)
            flow.train()
        if snapshot is not None and done < config.iterations and time.perf_counter() - last_saved >= snapshot.every_s:
            save_snapshot(snapshot.path, state(final=False))
            last_saved, wrote = time.perf_counter(), True
    bar.close()
    flow.eval()
    selected = done
    if status == "ok" and best is not None:
        flow.load_state_dict(best[2])
        selected = best[1]
    result = TrainResult(status, reason, done, elapsed() - validation_wall[0], history, asdict(config),
                         validation=scores, selected_iteration=selected, validation_wall_s=validation_wall[0],
                         resumed_from_iteration=resumed_from, earlier_wall_s=earlier_s,
                         skipped_steps=None if guard is None else guard.skipped)
    if snapshot is not None and (wrote or resumed_from is not None or elapsed() >= snapshot.every_s):
        save_snapshot(snapshot.path, state(final=True))
    return result


def _random_state(device: torch.device) -> dict[str, Any]:
    """torch's global random state (and the CUDA device's), which the training estimators draw from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_random_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def mean_nll(flow: Flow, x: torch.Tensor, batch_size: int = 500, **options: Any) -> float:
    """Mean of ``-flow.log_prob(x, **options)`` over ``x`` in batches, without gradients.

    ``log_prob`` is exact for every flow whose :attr:`~eqbench.flows.base.Flow.density_estimate`
    is ``None`` (in either module mode); ``options`` pass ``iw_draws``/``generator`` to an
    importance-weighted one. Tasks record NLLs with :func:`eqbench.tasks.common.nll_records`,
    which says which it was.
    """
    flow.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            total += float(-flow.log_prob(x[start:start + batch_size], **options).sum())
    return total / len(x)
