"""Ornstein-Uhlenbeck reading of the mean pair distance: tau ~ 2 var / (per-step squared change).

On protocol 2's training split (cache file named below): its stationary variance over the 1,000
samples, and the mean squared change of 100 chains over 200 Metropolis steps at 0.006.
"""
import glob, numpy as np, torch
torch.set_num_threads(1)
from eqbench.systems.lennard_jones import make_lj55
from eqbench.data.mcmc import _metropolis_step
from eqbench.geometry import pairwise_distances
s = make_lj55()
x = torch.from_numpy(np.load(glob.glob('/root/.cache/eqbench/data/lj55-train-6fde48c64242.npy')[0]))
md = pairwise_distances(x).mean(-1)
sig2 = float(md.var())
g = torch.Generator().manual_seed(5)
x0 = x[:100].clone(); u = s.energy(x0)
with torch.no_grad():
    m0 = pairwise_distances(x0).mean(-1)
    lag = 200
    for _ in range(lag): x0,u,_ = _metropolis_step(s,x0,u,0.006,g)
    m1 = pairwise_distances(x0).mean(-1)
d2 = float(((m1-m0)**2).mean())/lag
print("sigma2", sig2, "delta2 per step", d2, "OU tau_int ~ 2 sigma2/delta2 =", 2*sig2/d2)
