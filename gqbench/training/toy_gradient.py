"""The paper's gradient-accuracy experiment (from the ACA and MALI papers): dz/dt = a z, z(0) = z0 = 10,
a = 0.2, loss L = z(T)^2, so z(T) = z0 e^{aT} and, in closed form,

    dL/da = 2 T z0^2 e^{2aT},   dL/dz0 = 2 z0 e^{2aT},   dL/dT = 2 a z0^2 e^{2aT}.

Each method's gradient with respect to a, z0 and T is compared with these as T grows, at the case's solver
and tolerances (and dtype: float64 shows the solver's error, float32 hits rounding first). Rows go to the
`toy_gradient` table, one per T; the case's results row carries the error at the largest T. The case's
`epochs` and `width` are not used (a toy case has epochs = 1). MALI and ACA (TorchDiffEqPack) take t0, t1
as numbers: they give no gradient with respect to T (its error is NaN for them).
"""

from __future__ import annotations

import math

from ..define.experiments import Z0, A, ToyGradient, exact

__all__ = ["A", "Z0", "ToyGradient", "exact", "run_case"]


def run_case(problem: ToyGradient, *, case, cache_dir=None):
    """One toy case: -> ([results row], {"toy_gradient": a row per horizon})."""
    import torch

    from ..measurement.measure import Skip
    from .loop import CountedSolve

    if case.device.startswith("cuda") and not torch.cuda.is_available():
        raise Skip(f"device={case.device} but torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(case.threads)
    dtype = getattr(torch, case.dtype)
    key = dict(case.to_dict(), case_id=case.case_id)
    rows = []
    for T in problem.horizons:
        field = _field(dtype, case.device)
        solve = CountedSolve(case, field)
        z0 = torch.tensor([Z0], dtype=dtype, device=case.device, requires_grad=True)
        horizon = torch.tensor(T, dtype=dtype, device=case.device, requires_grad=True)
        t = torch.stack([torch.zeros_like(horizon), horizon])
        loss = solve(field, z0, t)[-1].pow(2).sum()
        loss.backward()
        solve.after_backward()
        ref = exact(T)
        got = dict(a=field.a.grad, z0=z0.grad, T=horizon.grad)
        err = {k: math.nan if g is None else abs(float(g.sum()) - ref[k]) / abs(ref[k]) for k, g in got.items()}
        known = [k for k in ("a", "z0", "T") if got[k] is not None]
        num = math.sqrt(sum((float(got[k].sum()) - ref[k]) ** 2 for k in known))
        rel = num / math.sqrt(sum(ref[k] ** 2 for k in known))
        rows.append(dict(key, T=T, err_a=err["a"], err_z0=err["z0"], err_T=err["T"], grad_rel_err=rel,
                         loss_rel_err=abs(float(loss.detach()) - ref["z"] ** 2) / ref["z"] ** 2,
                         nfe_fwd=solve.nfe_forward, nfe_bwd=solve.nfe_backward))  # fmt: skip
    last = rows[-1]
    finite = all(math.isfinite(r["grad_rel_err"]) for r in rows)
    row = dict(key, repeat=0, fwd_s=math.nan, bwd_s=math.nan, peak_mem_bytes=math.nan, nfe_fwd=last["nfe_fwd"],
               nfe_bwd=last["nfe_bwd"], grad_rel_err=last["grad_rel_err"], loss=math.nan, compile_s=math.nan,
               setup_s=0.0, warmup=0, status="ok" if finite else "nan",
               error="" if finite else "non-finite gradient")  # fmt: skip
    return [row], dict(toy_gradient=rows)


def _field(dtype, device):
    import torch

    class Linear1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(A, dtype=dtype, device=device))

        def forward(self, t, z):
            return self.a * z

    return Linear1D()
