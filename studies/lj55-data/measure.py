"""LJ-55 protocol measurement: compact start, burn-in trace, α·s scan, autocorrelation times."""
import sys, time, json, dataclasses
import numpy as np, torch
torch.set_num_threads(1)
from eqbench.systems.lennard_jones import make_lennard_jones, LJ55_PROTOCOL
from eqbench.systems.lennard_jones import LennardJones
from eqbench.data.mcmc import _metropolis_step
from eqbench.data.step_size import scan_step_sizes, best_step_size
from eqbench.data import diagnostics as diag
from eqbench.geometry import pairwise_distances
init_scale = float(sys.argv[1]); n_burn = int(sys.argv[2]); n_prod = int(sys.argv[3]); chains = int(sys.argv[4])
s = LennardJones(name="lj55", n_particles=55, n_dims=3, data_protocol=dataclasses.replace(LJ55_PROTOCOL, init_scale=init_scale))
g = torch.Generator().manual_seed(21)
t0 = time.perf_counter()
x = s.initial_configurations(chains, g) if n_burn > 0 else torch.load("/work/study/lj55_eq.pt"); u = s.energy(x)
print("start u", float(u.mean()), "init", time.perf_counter()-t0, flush=True)
acc = 0
with torch.no_grad():
    for k in range(n_burn):
        x, u, a = _metropolis_step(s, x, u, 0.01, g); acc += int(a.sum())
        if k % 2000 == 1999:
            print("burn", k+1, round(time.perf_counter()-t0), "u", round(float(u.mean()), 2), "+-", round(float(u.std()/chains**.5), 2),
                  "acc", round(acc/2000/chains, 3), flush=True); acc = 0
if n_burn > 0: torch.save(x, "/work/study/lj55_eq.pt")
probes, _, _ = scan_step_sizes(s, [0.005, 0.006, 0.007, 0.008, 0.009, 0.010, 0.012, 0.014], equilibration_steps=0, n_steps=1000, seed=3, start=x)
for p in probes: print("scan", p, flush=True)
best = best_step_size(probes); print("best", best, flush=True)
step = best.step_size
every = 10
tr_u = np.empty((n_prod // every, chains)); tr_d = np.empty((n_prod // every, chains)); acc = 0
with torch.no_grad():
    for k in range(n_prod):
        x, u, a = _metropolis_step(s, x, u, step, g); acc += int(a.sum())
        if (k+1) % every == 0:
            tr_u[(k+1)//every-1] = u.numpy(); tr_d[(k+1)//every-1] = pairwise_distances(x).mean(-1).numpy()
        if k % 10000 == 9999:
            n = (k+1)//every
            print("prod", k+1, round(time.perf_counter()-t0), "acc", round(acc/(k+1)/chains, 3), "u", round(float(tr_u[:n].mean()), 2),
                  "tau_u", round(diag.integrated_autocorrelation_time(tr_u[:n])*every), "tau_d", round(diag.integrated_autocorrelation_time(tr_d[:n])*every), flush=True)
np.save("/work/study/lj55_tr_u.npy", tr_u); np.save("/work/study/lj55_tr_d.npy", tr_d)
for half in (slice(0, n_prod//every//2), slice(n_prod//every//2, None)):
    print("half tau_u", diag.integrated_autocorrelation_time(tr_u[half])*every, "tau_d", diag.integrated_autocorrelation_time(tr_d[half])*every)
print("chains halves", diag.integrated_autocorrelation_time(tr_u[:, :chains//2])*every, diag.integrated_autocorrelation_time(tr_u[:, chains//2:])*every,
      diag.integrated_autocorrelation_time(tr_d[:, :chains//2])*every, diag.integrated_autocorrelation_time(tr_d[:, chains//2:])*every)
print("total", time.perf_counter()-t0)
