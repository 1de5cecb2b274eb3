"""Bring your own flat flow: a bijection of R^{(N-1)·D} as an eqbench :class:`~eqbench.flows.base.Flow`.

Why: most flow libraries (zuko, nflows, normflows, …) act on flat feature vectors, while eqbench's
configurations are ``[n, N, D]`` tensors on the centre-of-mass-free subspace U (SPEC §1; paper §5
"Invariant Prior Density", A.3). A flow on all ``N·D`` coordinates has no density on U unless it
models the CoM too (real NVP does, with a Gaussian CoM whose marginal costs an importance-weighted
estimate, paper B.2). This adapter instead gives the flat flow exactly the ``(N - 1) D``
coordinates of U:

    y = Bᵀ vec(x)        (B: the orthonormal basis :func:`eqbench.geometry.com_free_basis`)
    u, log|det ∂u/∂y| = bijection.forward(y)            (the user's flow, data -> latent)
    z = unvec(B u)       (a CoM-free latent configuration, eqbench's prior)

``B`` is an isometry from R^{(N-1)D} onto U, so the log-determinant of the user's flow *is* the
log-determinant on U, and the standard normal on the ``(N - 1) D`` latent coordinates *is*
eqbench's CoM-free prior (:class:`~eqbench.flows.prior.CoMFreeNormal`, normaliser
``(N - 1) D / 2 · log 2π``). ``log_prob`` is therefore exact and its NLL comparable with every
other model's: an identity bijection gives exactly the NLL of the ``gaussian`` baseline at scale 1.
The density is translation invariant by construction (``Bᵀ`` drops the CoM); it has no other
symmetry unless the caller says so (``symmetries=``), and the contract check holds any claim to it.

Two kinds of flat flow are accepted (:func:`as_flat_bijection`):

- any object with ``forward(y) -> (u, log|det ∂u/∂y|)`` and ``inverse(u) -> (y, log|det ∂y/∂u|)``
  on ``[n, (N-1)·D]`` tensors (:class:`FlatBijection`; the normalising direction, as nflows'
  transforms); an ``nn.Module`` has its parameters trained and saved with the flow;
- an unconditional ``zuko.flows.Flow`` (:class:`ZukoBijection`) whose base is a standard normal,
  as zuko's flows have by default; its transform is used and its base is eqbench's prior.

:func:`flat_flow_builder` turns a factory of such flows into a registry builder that declares its
capabilities (:func:`eqbench.capabilities.model_builder`), validates its settings and loads a
``checkpoint`` (a saved ``state_dict``) given in the model config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from eqbench.capabilities import model_builder
from eqbench.errors import ConfigError
from eqbench.flows.base import Flow
from eqbench.flows.cnf import parse_dtype
from eqbench.flows.settings import Setting, check_settings, dtype_setting
from eqbench.geometry import com_free_basis
from eqbench.systems.base import SYMMETRIES, ParticleSystem

__all__ = ["FlatBijection", "FlatFlow", "ZukoBijection", "as_flat_bijection", "flat_flow_builder",
           "load_checkpoint"]

#: Settings every builder made by :func:`flat_flow_builder` accepts besides its own.
FLAT_OPTIONS = ("checkpoint", "dtype")
#: A flat flow's own settings, when named without a schema: any value (the factory judges it).
_ANY = Setting(lambda value: True, "any value")
_CHECKPOINT = Setting(lambda value: value is None or isinstance(value, str | PathLike),
                      "the path of a torch.save'd state_dict")


@runtime_checkable
class FlatBijection(Protocol):
    """A bijection of R^k in the normalising direction (data ``y`` -> latent ``u``), batched ``[n, k]``.

    Both methods return the mapped tensor and the per-sample ``log|det|`` of *that* map, shape
    ``[n]`` (a scalar or per-feature ``[n, k]`` log-determinant is summed/broadcast by the adapter).

    Example:
        >>> import math
        >>> class Scale:
        ...     def forward(self, y): return 2 * y, torch.full(y.shape[:1], y.shape[1] * math.log(2))
        ...     def inverse(self, u): return u / 2, torch.full(u.shape[:1], -u.shape[1] * math.log(2))
        >>> isinstance(Scale(), FlatBijection)
        True
    """

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _per_sample(logdet: torch.Tensor | float, n: int, like: torch.Tensor) -> torch.Tensor:
    """A log-determinant as ``[n]``: per-feature terms summed, a scalar broadcast."""
    ld = torch.as_tensor(logdet, dtype=like.dtype, device=like.device)
    while ld.dim() > 1:
        ld = ld.sum(dim=-1)
    return ld.expand(n) if ld.dim() == 0 else ld


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _zuko_flow_class() -> type | None:
    try:
        from zuko.lazy import Flow as ZukoFlow
    except ImportError:  # zuko is optional (extra "zuko")
        return None
    return ZukoFlow


class ZukoBijection(nn.Module):
    """An unconditional ``zuko.flows.Flow`` as a :class:`FlatBijection`: its transform, not its base.

    zuko's transform maps data to its base space (``flow().log_prob(y) = base.log_prob(t(y)) +
    ladj``). The base must be a standard normal on ``features`` coordinates, as zuko's flows (NSF,
    MAF, NICE, …) have by default: that is eqbench's prior in flat coordinates, so the NLL keeps
    one meaning (SPEC §1). A trainable or non-normal base would change the prior and is refused.

    Example:
        >>> import zuko
        >>> bij = ZukoBijection(zuko.flows.NSF(6, transforms=2, hidden_features=[16], passes=2))
        >>> u, ld = bij.forward(torch.randn(3, 6))
        >>> tuple(u.shape), tuple(ld.shape), bij.n_features
        ((3, 6), (3,), 6)
    """

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        zuko_flow = _zuko_flow_class()
        if zuko_flow is None or not isinstance(flow, zuko_flow):
            raise ConfigError(f"expected an unconditional zuko.flows.Flow, got {type(flow).__name__}")
        self.flow = flow
        self.n_features = self._standard_normal_features(flow)

    @staticmethod
    def _standard_normal_features(flow: nn.Module) -> int:
        """The number of features of the flow's base, which must be N(0, I) with fixed parameters."""
        from torch.distributions import Independent, Normal

        if any(True for _ in flow.base.parameters()):
            raise ConfigError("the zuko flow's base has trainable parameters; eqbench's prior is a fixed "
                              "standard normal (use the flow's default base)")
        base = flow.base()
        inner = base.base_dist if isinstance(base, Independent) else None
        ok = (isinstance(inner, Normal) and len(base.event_shape) == 1
              and bool((inner.loc == 0).all()) and bool((inner.scale == 1).all()))
        if not ok:
            raise ConfigError(f"the zuko flow's base must be a standard normal on flat features "
                              f"(eqbench's prior), got {type(base).__name__}")
        return int(base.event_shape[0])

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data to latent: ``(u, log|det ∂u/∂y|)``."""
        u, ladj = self.flow.transform().call_and_ladj(y)
        return u, _per_sample(ladj, y.shape[0], y)

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent to data: ``(y, log|det ∂y/∂u|)``."""
        y, ladj = self.flow.transform().inv.call_and_ladj(u)
        return y, _per_sample(ladj, u.shape[0], u)


def as_flat_bijection(obj: Any) -> FlatBijection:
    """``obj`` as a :class:`FlatBijection`: a zuko flow is wrapped, a bijection is returned as is.

    Raises a one-line :class:`~eqbench.errors.ConfigError` naming the accepted kinds otherwise.

    Example:
        >>> import zuko
        >>> type(as_flat_bijection(zuko.flows.MAF(4))).__name__
        'ZukoBijection'
    """
    zuko_flow = _zuko_flow_class()
    if zuko_flow is not None and isinstance(obj, zuko_flow):
        return ZukoBijection(obj)
    if callable(getattr(obj, "forward", None)) and callable(getattr(obj, "inverse", None)):
        return obj
    raise ConfigError(f"cannot use {type(obj).__name__} as a flat flow; valid: a zuko.flows.Flow, or an "
                      f"object with forward(y) -> (u, logdet) and inverse(u) -> (y, logdet)")


class FlatFlow(Flow):
    """A flat bijection of the ``(N - 1) D`` CoM-free coordinates as an eqbench flow (module docstring).

    ``forward(z)`` maps a CoM-free latent configuration to a CoM-free configuration through the
    bijection's ``inverse``; ``inverse(x)`` goes through its ``forward``. Log-determinants are
    the bijection's, which are those on U because the basis is orthonormal.

    Example:
        >>> import eqbench, zuko
        >>> system = eqbench.get_system("dw4")
        >>> flow = FlatFlow(system, zuko.flows.NSF(6, transforms=2, hidden_features=[16], passes=2))
        >>> x, log_q = flow.sample(5)
        >>> bool(x.mean(dim=1).abs().max() < 1e-6), bool(torch.allclose(flow.log_prob(x), log_q, atol=1e-4))
        (True, True)
    """

    def __init__(self, system: ParticleSystem, bijection: Any, *, symmetries: Iterable[str] = ()) -> None:
        super().__init__(system)
        claimed = tuple(symmetries)
        unknown = sorted(set(claimed) - set(SYMMETRIES))
        if unknown:
            raise ConfigError(f"unknown symmetries {', '.join(unknown)}; valid: {', '.join(SYMMETRIES)}")
        # Dropping the CoM makes every flat flow's density translation invariant (paper §5, S1).
        self.symmetries = tuple(s for s in SYMMETRIES if s in {*claimed, "translation"})
        self.n_features = system.n_dof
        self.bijection = as_flat_bijection(bijection)
        declared = getattr(self.bijection, "n_features", None)
        if declared is not None and declared != self.n_features:
            raise ConfigError(f"the flat flow has {declared} features; {system.name} needs "
                              f"(N-1)·D = {self.n_features}")
        # Not a buffer: the basis is a constant of (N, D), kept in float64 and cast per call, so that
        # .float()/.double() round trips never degrade it and state_dicts hold only the user's flow.
        self._basis64 = com_free_basis(system.n_particles, system.n_dims)
        self._basis_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self._basis_cache:
            self._basis_cache[key] = self._basis64.to(dtype=like.dtype, device=like.device)
        return self._basis_cache[key]

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """Flat CoM-free coordinates ``y = Bᵀ vec(x)``, ``[n, N, D] -> [n, (N-1)·D]`` (drops any CoM)."""
        return x.reshape(x.shape[0], -1) @ self._basis(x)

    def configuration(self, y: torch.Tensor) -> torch.Tensor:
        """The CoM-free configuration ``unvec(B y)``, ``[n, (N-1)·D] -> [n, N, D]``."""
        return (y @ self._basis(y).T).reshape(y.shape[0], self.n_particles, self.n_dims)

    def _checked(self, out: tuple[torch.Tensor, torch.Tensor], what: str, n: int,
                 like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, logdet = out
        if value.shape != (n, self.n_features):
            raise ValueError(f"the flat flow's {what} returned shape {tuple(value.shape)}, "
                             f"expected {(n, self.n_features)}")
        return value, _per_sample(logdet, n, like)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent to configuration: ``(x, log|det ∂x/∂z|)`` on U."""
        u = self.coordinates(z)
        y, logdet = self._checked(self.bijection.inverse(u), "inverse", z.shape[0], u)
        return self.configuration(y), logdet

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Configuration to latent: ``(z, log|det ∂z/∂x|)`` on U."""
        y = self.coordinates(x)
        u, logdet = self._checked(self.bijection.forward(y), "forward", x.shape[0], y)
        return self.configuration(u), logdet

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a saved ``state_dict``: this flow's, or the flat flow's own (a zuko flow's, say).

        Why both: weights trained through eqbench are saved as ``flow.state_dict()``, weights
        trained in the flat library alone as that library's module's state_dict; either must
        load. Raises a one-line ConfigError naming missing and unexpected keys otherwise.
        """
        load_checkpoint(self, path)


def load_checkpoint(flow: nn.Module, path: str | Path) -> None:
    """Load the ``state_dict`` saved at ``path`` into ``flow`` (the ``checkpoint`` model setting).

    The file holds a ``state_dict`` (``torch.save(flow.state_dict(), path)``), or a dict with one
    under the key ``"state_dict"`` beside metadata. ``flow``'s own keys are tried first; for a
    :class:`FlatFlow`, the keys of the user's flat module (``flow.bijection``, or the zuko flow
    inside it) too. Errors are one-line ConfigErrors.

    Example:
        >>> import eqbench, tempfile, os
        >>> flow = eqbench.build_model("gaussian", "dw4", {"scale": 2.0})
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save(flow.state_dict(), path)
        >>> twin = eqbench.build_model("gaussian", "dw4"); load_checkpoint(twin, path)
        >>> round(float(twin.log_scale.detach().exp()), 6)
        2.0
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} is not a file; expected a torch.save'd state_dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read as a state_dict: {_one_line(exc)}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # metadata around a state_dict
    if not isinstance(state, Mapping):
        raise ConfigError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a state_dict")
    candidates: list[nn.Module] = [flow]
    inner = getattr(flow, "bijection", None)
    if isinstance(inner, ZukoBijection):
        candidates.append(inner.flow)
    if isinstance(inner, nn.Module):
        candidates.append(inner)
    for module in candidates:
        if set(module.state_dict()) == set(state):
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:  # same names, other shapes: another configuration's weights
                raise ConfigError(f"checkpoint {str(path)!r} does not fit {type(flow).__name__}: "
                                  f"{_one_line(exc)}") from exc
            return
    expected = set(flow.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    raise ConfigError(f"checkpoint {str(path)!r} does not fit {type(flow).__name__}: "
                      f"missing keys {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                      f"unexpected keys {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")


def flat_flow_builder(
    make: Callable[[int, dict[str, Any]], Any],
    *,
    name: str,
    description: str,
    settings: Iterable[str] | Mapping[str, Setting] = (),
    symmetries: Iterable[str] = (),
    trainable: bool = True,
) -> Callable[[ParticleSystem, Mapping[str, Any] | None], FlatFlow]:
    """A registry builder ``build(system, config) -> FlatFlow`` from a factory of flat flows.

    ``make(n_features, config)`` returns a zuko flow or a :class:`FlatBijection` for
    ``n_features = (N-1)·D``; ``config`` holds only the keys named in ``settings`` that the model
    config sets. Every builder also accepts ``checkpoint`` (path of a saved ``state_dict``, loaded
    after building: :func:`load_checkpoint`) and ``dtype`` (``"float32"``, the default, or
    ``"float64"``); other keys are a one-line ConfigError naming the valid ones. ``settings``
    (names, or a mapping of names) may map a name to an :class:`eqbench.flows.settings.Setting`
    (e.g. ``{"transforms": integer(1)}``) so that its values are checked too. The builder declares
    that check (``model_builder(validate=...)``: names, values, ``dtype``, that a checkpoint is
    a file; the factory is not called), so planning refuses bad settings before any cell runs.

    Capabilities are declared (:func:`eqbench.capabilities.model_builder`) from the arguments:
    ``exact-density`` always (the adapter's density is exact), ``trainable`` unless
    ``trainable=False``, ``equivariant`` only when ``symmetries`` claims rotation and
    permutation. The pre-flight check refuses a model that is not what it declares.

    Example:
        >>> import zuko
        >>> build = flat_flow_builder(lambda k, cfg: zuko.flows.MAF(k, transforms=int(cfg.get("transforms", 2))),
        ...                           name="maf", description="zuko MAF on flat coordinates",
        ...                           settings=["transforms"])
        >>> sorted(build.capabilities), build.description
        (['exact-density', 'trainable'], 'zuko MAF on flat coordinates')
        >>> import eqbench
        >>> build(eqbench.get_system("dw4"), {"transforms": 1}).n_features
        6
    """
    pairs = settings.items() if isinstance(settings, Mapping) else ((key, None) for key in settings)
    own = {key: value if isinstance(value, Setting) else _ANY for key, value in pairs}
    schema = {**own, "checkpoint": _CHECKPOINT, "dtype": dtype_setting()}
    valid = sorted(schema)
    claimed = tuple(symmetries)
    capabilities = {"exact-density"}
    if trainable:
        capabilities.add("trainable")
    if {"rotation", "permutation"} <= set(claimed):
        capabilities.add("equivariant")

    def validate(system: ParticleSystem, config: Mapping[str, Any]) -> None:
        """The settings' names, ``dtype`` and that a ``checkpoint`` is a file; nothing is built
        and the factory is not called (planning calls this in a sweep's parent process)."""
        check_settings(config, name, schema)
        checkpoint = config.get("checkpoint")
        if checkpoint and not Path(checkpoint).is_file():
            raise ConfigError(f"checkpoint {str(checkpoint)!r} is not a file; expected a torch.save'd state_dict")

    @model_builder(capabilities=capabilities, description=description, validate=validate)
    def build(system: ParticleSystem, config: Mapping[str, Any] | None = None) -> FlatFlow:
        check_settings(config or {}, name, schema)
        config = dict(config or {})
        checkpoint = config.pop("checkpoint", None)
        dtype = parse_dtype(config.pop("dtype", "float32"), name)
        flow = FlatFlow(system, make(system.n_dof, config), symmetries=claimed).to(dtype)
        if checkpoint:
            load_checkpoint(flow, checkpoint)
        return flow

    build.__doc__ = f"{description}\n\nSettings: {', '.join(valid)} (eqbench.flows.flat.flat_flow_builder)."
    # The model's code is the factory's module, not this one: cells must be keyed by its version
    # (eqbench.versions.object_code_version), so that a changed plugin never reuses old cells.
    build.__module__ = getattr(make, "__module__", None) or __name__
    return build
