"""Plain AIS on LJ-55 along the geometric path, printing how the log-weight spread, the ESS and the
chains' mean energy evolve (python ais_trajectory.py K CHAINS POWER; ais-trajectory-K3000.log).
Uses eqbench.free_energy internals as of the commit that added SMC; one torch thread."""
import sys, time, math, torch, numpy as np
torch.set_num_threads(1)
from eqbench.components import get_system
from eqbench import free_energy as fe
from eqbench.geometry import remove_com
K = int(sys.argv[1]); chains = int(sys.argv[2]); power = float(sys.argv[3])
s = get_system("lj55")
st = fe.AISSettings(n_chains=chains, n_temperatures=K, schedule_power=power, base_scale=1.0, n_pilot_chains=32)
betas = fe.annealing_schedule(K, power)
t0 = time.perf_counter()
steps = fe._pilot_steps(s, st, betas)
g = torch.Generator().manual_seed(0)
a = fe._Annealer(s, 1.0, g)
x = remove_com(torch.randn(chains, 55, 3, generator=g, dtype=torch.float64))
state = a._state(x); lw = torch.zeros(chains, dtype=torch.float64)
marks = set(int(K * f) for f in np.linspace(0.05, 1, 20)) | {K - 1}
for t in range(1, K):
    b, p = float(betas[t]), float(betas[t-1])
    lw += (b - p) * (state[0] - state[1])
    x, state, acc = a.mala(x, state, b, steps[t-1])
    if t in marks:
        w = lw.numpy(); wn = w - w.max(); ess = np.exp(wn).sum()**2 / np.exp(2*wn).sum() / chains
        print(f"t {t:6d} beta {b:.3e} step {steps[t-1]:.2e} lw mean {w.mean():10.2f} std {w.std():9.2f} min {w.min():10.1f} ess {ess:.3f} u_LJ+osc mean {float(state[1].mean()):9.2f}", flush=True)
w = lw.numpy(); m = w.max(); print("log mean w", m + math.log(np.exp(w - m).mean()) + fe.base_log_z(55, 3, 1.0), "wall", time.perf_counter() - t0)
