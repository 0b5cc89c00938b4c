"""One training iteration (forward + loss + backward) of a paper experiment's model, every gradient method in
ONE process, rounds alternating: the per-iteration ratios issue 17's training table quotes.

    python benchmarks/train_iterations.py sines 64 [--rounds 9] [--rtol 1e-3]

The model is the experiment's (`gqbench.training`), at its initial weights, on the first batch of its training
set; no optimiser step, so every round times the same arithmetic. Per method: median iteration and backward
time, and the median over rounds of each round's ratio to direct backprop (with the rounds' range) and to
torchdiffeq's adjoint. `gqbench run --preset train` gives the per-epoch figures of whole training runs, one
fresh process per case. With the paper's torch_gq_adjoint on PYTHONPATH, its `odeint_adjoint_gq` is timed too.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
import torchdiffeq

import impls
from gqbench.training import TRAINING_PROBLEMS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("problem", choices=sorted(TRAINING_PROBLEMS))
    p.add_argument("width", type=int)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    exp = TRAINING_PROBLEMS[args.problem]
    data = exp.make_data(seed=0)
    torch.manual_seed(0)
    model = exp.make_model(width=args.width)
    batch = getattr(exp, "default_batch", None) or len(data.x_train)
    x, y, t = data.x_train[:batch], data.y_train[:batch], data.t
    kw = dict(rtol=args.rtol, atol=args.rtol)
    solvers = {
        "torch_direct": lambda f, y0, tt: torchdiffeq.odeint(f, y0, tt, **kw),
        "torch_adjoint": lambda f, y0, tt: torchdiffeq.odeint_adjoint(f, y0, tt, **kw),
        "torch_seminorm": lambda f, y0, tt: torchdiffeq.odeint_adjoint(
            f, y0, tt, adjoint_options=dict(norm="seminorm"), **kw
        ),
        "torch_gq (default)": lambda f, y0, tt: impls.odeint_adjoint_gq(f, y0, tt, **kw),
        "torch_gq[gtol=0.1]": lambda f, y0, tt: impls.odeint_adjoint_gq(f, y0, tt, gtol=0.1, **kw),
    }
    if importlib.util.find_spec("torch_gq_adjoint") is not None:  # the paper's code, from a checkout on PYTHONPATH
        solvers["torch_paper_gq"] = lambda f, y0, tt: impls.odeint_paper_gq(f, y0, tt, **kw)

    def iteration(name):
        for q in model.parameters():
            q.grad = None
        t0 = time.perf_counter()
        loss = exp.loss(pred=model(x, t, solvers[name]), target=y)
        t1 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0, time.perf_counter() - t1

    names = list(solvers)
    for name in names:  # warm-up
        iteration(name)
    samples = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(iteration(name))
    print(f"{args.problem} w={args.width} batch={len(x)} rtol={args.rtol:g}, {args.rounds} rounds")
    for name in names:
        total = [a for a, _ in samples[name]]
        vs_direct = [a / d for (a, _), (d, _) in zip(samples[name], samples["torch_direct"])]
        vs_adjoint = [a / d for (a, _), (d, _) in zip(samples[name], samples["torch_adjoint"])]
        print(f"  {name:<20} iteration {statistics.median(total) * 1e3:8.1f} ms  backward "
              f"{statistics.median(b for _, b in samples[name]) * 1e3:8.1f} ms  / direct "
              f"{statistics.median(vs_direct):.2f} [{min(vs_direct):.2f}, {max(vs_direct):.2f}]  / adjoint "
              f"{statistics.median(vs_adjoint):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
