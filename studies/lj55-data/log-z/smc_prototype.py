"""The prototype that measured sequential Monte Carlo (resampled AIS) on LJ-55 before it went into
eqbench.free_energy (python smc_prototype.py K CHAINS POWER POPULATIONS MALA_STEPS f|r; f = forward
from the base, r = reverse from the test split). The library version resamples the same way but
draws its random numbers in another order, so its bits differ. Logs: smc-K*.log."""
import sys, time, math, torch, numpy as np
torch.set_num_threads(1)
from eqbench.components import get_system
from eqbench import free_energy as fe
from eqbench.geometry import remove_com
from eqbench.data.loading import load_data
K = int(sys.argv[1]); chains = int(sys.argv[2]); power = float(sys.argv[3]); G = int(sys.argv[4]); nst = int(sys.argv[5]); direction = sys.argv[6]
s = get_system("lj55")
st = fe.AISSettings(n_chains=chains, n_temperatures=K, schedule_power=power, base_scale=1.0, n_pilot_chains=32)
betas = fe.annealing_schedule(K, power)
t0 = time.perf_counter()
steps = fe._pilot_steps(s, st, betas)
g = torch.Generator().manual_seed(0)
a = fe._Annealer(s, 1.0, g)
if direction == "f":
    x = remove_com(torch.randn(chains, 55, 3, generator=g, dtype=torch.float64)); sign = 1
else:
    x = remove_com(load_data(s, "test", n=chains, seed=0).double()); betas = betas.flip(0); steps = list(steps[-2::-1]) + [steps[0]]; sign = -1
state = a._state(x); lw = torch.zeros(chains, dtype=torch.float64); acc_logz = torch.zeros(G, dtype=torch.float64)
m = chains // G; nres = 0
for t in range(1, K):
    b, p = float(betas[t]), float(betas[t-1])
    lw += (b - p) * (state[0] - state[1])
    W = lw.view(G, m)
    wn = torch.softmax(W, dim=1); ess = 1.0 / (wn**2).sum(1) / m
    if (ess < 0.5).any():
        idx = []
        for gi in range(G):
            if ess[gi] < 0.5:
                acc_logz[gi] += torch.logsumexp(W[gi], 0) - math.log(m)
                cdf = torch.cumsum(wn[gi], 0); cdf[-1] = 1.0
                pos = (torch.rand((), generator=g, dtype=torch.float64) + torch.arange(m, dtype=torch.float64)) / m
                sel = torch.searchsorted(cdf, pos).clamp(max=m-1) + gi * m
                lw[gi*m:(gi+1)*m] = 0.0; nres += 1
            else:
                sel = torch.arange(gi*m, (gi+1)*m)
            idx.append(sel)
        idx = torch.cat(idx)
        x = x[idx]; state = tuple(v[idx] for v in state)
    for _ in range(nst):
        x, state, acc = a.mala(x, state, b, steps[t-1])
    if t % (K // 10) == 0:
        print(f"t {t} beta {b:.3e} u mean {float(state[1].mean()):9.2f} resamplings {nres}", flush=True)
W = lw.view(G, m); acc_logz += torch.logsumexp(W, 1) - math.log(m)
est = sign * (torch.logsumexp(acc_logz, 0) - math.log(G)) + fe.base_log_z(55, 3, 1.0)
per = sign * acc_logz + fe.base_log_z(55, 3, 1.0)
print(direction, "log Z", float(est), "groups", [round(float(v), 1) for v in per], "wall", time.perf_counter() - t0)
