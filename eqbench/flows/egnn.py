"""E(n)-equivariant graph network (EGNN; Satorras, Hoogeboom & Welling, ICML 2021) on all particle pairs.

Why one module: the E(n)-equivariant CNF (:mod:`eqbench.flows.en_flow`, Satorras et al. NeurIPS
2021) uses an EGNN as its velocity field, and the SE(3) augmented coupling flow
(:mod:`eqbench.flows.augmented_coupling`, Midgley et al. NeurIPS 2023) uses one to build the
equivariant frames and invariant spline parameters of each coupling layer. Both need the same
layer; it lives here once.

**Layer** (Satorras et al. 2021, eq. 3-6, as in the authors' ``egnn/gcl.py`` of
github.com/vgsatorras/en_flows). For particles ``i`` with positions ``x_i ∈ R^D`` and invariant
features ``h_i``, on the fully connected graph without self-edges:

    m_ij = φ_e(h_i, h_j, |x_i - x_j|², |x⁰_i - x⁰_j|²)          (edge MLP, two SiLU layers)
    m_ij ← m_ij · sigmoid(w·m_ij + b)                              (attention gate, optional)
    x_i ← x_i + Σ_{j≠i} (x_i - x_j) / (|x_i - x_j| + c) · r · tanh(φ_x(m_ij))
    h_i ← h_i + φ_h(h_i, Σ_{j≠i} m_ij)                             (residual node update)

``x⁰`` are the input positions (the authors pass their squared distances to every layer as an
edge attribute), ``c = distance_offset`` (the authors' 1, which keeps the update bounded for
close pairs), ``r = coords_range / layers`` (the authors' 15 / L; ``tanh=False`` drops the
``r · tanh``). ``φ_x``'s last linear map has no bias and starts at Xavier gain 0.001 (the
authors' choice), so the network starts close to the identity on positions.

**Outputs.** ``n_vectors`` translation-invariant, rotation/reflection-equivariant vectors per
particle and ``n_scalars`` invariant scalars per particle. The last layer has ``n_vectors``
coordinate heads ``φ_x^k``; vector ``k`` is the displacement ``x^{L-1}_i - x⁰_i`` of the first
``L - 1`` layers plus head ``k``'s update of the last layer, so with one head it is exactly the
authors' ``x_final - x`` (the E-NF velocity before its mean is removed). Scalars are a linear
read-out of the last ``h``; without scalar outputs the last layer's feature update, which
nothing would read (the authors compute it and discard it), is not built.

**Symmetries** (tested in ``tests/test_egnn.py``): for a rotation or reflection ``R``, a
translation ``s`` and a permutation ``P`` of the particles, ``vectors(P(xRᵀ + s), P h) =
P vectors(x, h) Rᵀ`` and ``scalars(P(xRᵀ + s), P h) = P scalars(x, h)``. Every operation is smooth
(the distance norm is ``sqrt(|x_i - x_j|² + 1e-8)``, as in the authors' code), so divergences and
their gradients are defined everywhere, including coincident particles.

Example:
    >>> import torch
    >>> net = EGNN(n_features_in=1, hidden=32, layers=3, n_vectors=2, n_scalars=4)
    >>> x = torch.randn(5, 4, 2); h = torch.ones(5, 4, 1)
    >>> vectors, scalars = net(x, h)
    >>> tuple(vectors.shape), tuple(scalars.shape)
    ((5, 4, 2, 2), (5, 4, 4))
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EGNN", "EGNNLayer"]

#: Added under the square root of squared pair distances (the authors' 1e-8): keeps the norm
#: differentiable at coincident particles.
_NORM_EPS = 1e-8


class EGNNLayer(nn.Module):
    """One equivariant graph convolution (module docstring) with ``heads`` coordinate heads."""

    def __init__(self, hidden: int, *, heads: int = 1, attention: bool = True, tanh: bool = True,
                 coords_range: float = 5.0, distance_offset: float = 1.0, update_features: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        act = nn.SiLU
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + 2, hidden, dtype=dtype), act(),
                                      nn.Linear(hidden, hidden, dtype=dtype), act())
        # The feature update of a last layer whose h nobody reads would get no gradient: not built.
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden, dtype=dtype), act(),
                                      nn.Linear(hidden, hidden, dtype=dtype)) if update_features else None
        last = nn.Linear(hidden, heads, bias=False, dtype=dtype)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden, dtype=dtype), act(), last)
        self.attention = nn.Sequential(nn.Linear(hidden, 1, dtype=dtype), nn.Sigmoid()) if attention else None
        self.tanh = tanh
        self.coords_range = float(coords_range)
        self.distance_offset = float(distance_offset)

    def forward(self, x: torch.Tensor, h: torch.Tensor, edge_attr: torch.Tensor, not_self: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [B, N, D], ``h`` [B, N, H], ``edge_attr`` [B, N, N, 1], ``not_self`` [N, N, 1]
        -> (coordinate updates [B, N, heads, D], new ``h``)."""
        n = x.shape[1]
        diff = x.unsqueeze(2) - x.unsqueeze(1)                       # [B, N, N, D]: x_i - x_j
        radial = diff.pow(2).sum(-1, keepdim=True)                   # [B, N, N, 1]
        hi = h.unsqueeze(2).expand(-1, -1, n, -1)
        hj = h.unsqueeze(1).expand(-1, n, -1, -1)
        m = self.edge_mlp(torch.cat([hi, hj, radial, edge_attr], dim=-1))
        if self.attention is not None:
            m = m * self.attention(m)
        m = m * not_self
        weight = self.coord_mlp(m)                                   # [B, N, N, heads]
        if self.tanh:
            weight = torch.tanh(weight) * self.coords_range
        unit = diff / (torch.sqrt(radial + _NORM_EPS) + self.distance_offset)
        update = torch.einsum("bijk,bijd->bikd", weight * not_self, unit)
        if self.node_mlp is not None:
            h = h + self.node_mlp(torch.cat([h, m.sum(dim=2)], dim=-1))
        return update, h


class EGNN(nn.Module):
    """Stack of :class:`EGNNLayer` with vector and scalar outputs per particle (module docstring)."""

    def __init__(self, n_features_in: int, *, hidden: int = 32, layers: int = 3, n_vectors: int = 1,
                 n_scalars: int = 0, attention: bool = True, tanh: bool = True, coords_range: float = 15.0,
                 distance_offset: float = 1.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if layers < 1 or n_vectors < 1 or hidden < 1 or n_features_in < 1 or n_scalars < 0:
            raise ValueError("EGNN needs layers, n_vectors, hidden and n_features_in >= 1 and n_scalars >= 0")
        self.n_vectors, self.n_scalars = n_vectors, n_scalars
        self.embedding = nn.Linear(n_features_in, hidden, dtype=dtype)
        per_layer = coords_range / layers
        self.layers = nn.ModuleList(
            EGNNLayer(hidden, heads=n_vectors if k == layers - 1 else 1, attention=attention, tanh=tanh,
                      coords_range=per_layer, distance_offset=distance_offset,
                      update_features=k < layers - 1 or n_scalars > 0, dtype=dtype)
            for k in range(layers)
        )
        self.readout = nn.Linear(hidden, n_scalars, dtype=dtype) if n_scalars else None

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` [B, N, D] positions, ``h`` [B, N, F] invariant features -> (vectors [B, N, V, D],
        scalars [B, N, S] or None when ``n_scalars = 0``)."""
        n = x.shape[1]
        not_self = (1.0 - torch.eye(n, dtype=x.dtype, device=x.device)).unsqueeze(-1)
        edge_attr = (x.unsqueeze(2) - x.unsqueeze(1)).pow(2).sum(-1, keepdim=True)
        h = self.embedding(h)
        pos = x
        for layer in self.layers[:-1]:
            update, h = layer(pos, h, edge_attr, not_self)
            pos = pos + update[:, :, 0]
        update, h = self.layers[-1](pos, h, edge_attr, not_self)
        vectors = (pos - x).unsqueeze(2) + update
        scalars = self.readout(h) if self.readout is not None else None
        return vectors, scalars
