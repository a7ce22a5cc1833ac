"""Adam step time on the report's naive network: the default (foreach) against fused (BENCHMARKS.md)."""
import time, torch, platform
from cifar_inception.models import create_model
torch.manual_seed(0)
model = create_model("seed-naive")
params = [p for p in model.parameters()]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
print(f"seed-naive: {sum(p.numel() for p in params):,} parameters; torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
for fused in (False, True):
    opt = torch.optim.Adam(params, lr=1e-3, fused=fused)
    opt.step()  # the states are allocated on the first step
    times = []
    for _ in range(5):
        t = time.perf_counter(); opt.step(); times.append(time.perf_counter() - t)
    times.sort()
    print(f"fused={fused}: median {times[2]:.3f} s a step (min {times[0]:.3f}, max {times[-1]:.3f}, n=5)")
    del opt
