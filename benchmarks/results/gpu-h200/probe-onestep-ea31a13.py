# one-off GPU probe (not committed): where does FASTMAML_CUDA_ONESTEP=1 go wrong at width 40?
import os, sys, torch, fastmaml
os.environ.setdefault("FASTMAML_CUDA_ONESTEP", "1")
from fastmaml.backends import cuda as cb
cb.ONESTEP = True
def run(T, W, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    dims = [1, W, W, 1]
    ps = []
    for a, b in zip(dims[:-1], dims[1:]):
        ps += [torch.randn(b, a, generator=g, dtype=torch.float64) / a ** 0.5, torch.randn(b, generator=g, dtype=torch.float64) * 0.1]
    xs = torch.rand(T, 10, 1, generator=g, dtype=torch.float64) * 10 - 5
    ys = torch.sin(xs + 1.0); xq = torch.rand(T, 10, 1, generator=g, dtype=torch.float64) * 10 - 5; yq = torch.sin(xq + 1.0)
    def go(backend, dt):
        p = [t.to("cuda", dt).requires_grad_() for t in ps]
        out = fastmaml.maml(p, xs.to("cuda", dt), ys.to("cuda", dt), xq.to("cuda", dt), yq.to("cuda", dt), backend=backend)
        gr = torch.autograd.grad(out.loss, p)
        return out.loss.double(), [x.double() for x in gr]
    l0, g0 = go("reference", torch.float64)
    l1, g1 = go("cuda", dtype)
    errs = [float((a - b).norm() / b.norm()) for a, b in zip(g1, g0)]
    print(f"T={T} W={W} {dtype}: loss rel {float((l1-l0).abs()/l0.abs()):.2e} grads rel {' '.join(f'{e:.1e}' for e in errs)}", flush=True)
for W in (40,):
    for T in (1024, 8192, 16384, 20000, 32768, 40000, 65536):
        try: run(T, W)
        except Exception as e: print(T, W, "error", e)
for T in (8192, 65536):
    try: run(T, 40, dtype=torch.float64)
    except Exception as e: print(T, "f64 error", e)
try:
    rep = torch.ops.fastmaml_testing.cuda_onestep_launch(torch.empty(1, device="cuda"), [1, 40, 40, 1], 10, 10, 65536); print("plan 65536", list(rep))
    rep = torch.ops.fastmaml_testing.cuda_onestep_launch(torch.empty(1, device="cuda"), [1, 40, 40, 1], 10, 10, 8192); print("plan 8192", list(rep))
except Exception as e: print("plan", e)
