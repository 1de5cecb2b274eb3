import sys, time, torch
torch.set_num_threads(1)
from eqbench.systems.lennard_jones import make_lennard_jones
from eqbench.data.mcmc import _metropolis_step
s = make_lennard_jones(55)
g = torch.Generator().manual_seed(5)
x = s.initial_configurations(128, g); u = s.energy(x)
t=time.perf_counter(); acc=0
step=float(sys.argv[1])
with torch.no_grad():
  for k in range(int(sys.argv[2])):
    x,u,a = _metropolis_step(s,x,u,step,g); acc+=int(a.sum())
    if k % 2000 == 1999:
        print(k+1, round(time.perf_counter()-t,1), "u", round(float(u.mean()),2), "+-", round(float(u.std()/128**.5),2), "acc", round(acc/2000/128,3), flush=True); acc=0
torch.save(x, "/work/study/lj55_burn.pt")
