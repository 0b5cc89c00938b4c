"""Trained states: a gradient problem's weights after `train_steps` steps of one fixed recipe, cached on disk.

Every single-gradient case with `train_steps = N > 0` is timed at these weights (and its float64
reference is computed at them), so the grid sees where a user's gradients are taken, not only the
initial weights where a neural ODE's field is smoothest. The recipe is the same for every method and
tolerance of the grid, so methods are compared at identical weights:

- direct backprop through `torchdiffeq.odeint` (dopri5, rtol = atol = 1e-3), full batch (the problem's
  y0), Adam at lr 1e-3, in the case's dtype, device and threads, from the problem's initial weights
  (the case's seed);
- the task: the problem's own loss where it is a training task (g1d, spheres, sines), the `target` a
  user's `make` returns (`gqbench.define.user_problems`), else a synthetic regression target, the fixed
  nonlinear map of y0 `sin(2 y0)` with its last axis reversed, fitted by y(t_end) in mean squared error
  (workload_l, oscillator, forced_mlp, linear, vanderpol, and user problems without a target).

The weights are saved once per (problem, width, batch, seed, steps, dtype, device) beside the reference
gradients (`DIR/references/` of a run, or `$GQBENCH_REFERENCE_DIR`), as an .npz of `func`'s state_dict,
written atomically; a rerun or a resumed run reuses them. The file name carries a hash of the recipe
(`RECIPE`, with its version) and, for a user problem, of its source file: editing either trains anew.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from ..define.case import Case
from ..define.grid import GridSpecError

# Bump `version` when what the recipe does changes (not only these numbers): old states are then not reused.
RECIPE = dict(version=1, optimizer="adam", lr=1e-3, solver="dopri5", rtol=1e-3, atol=1e-3,
              synthetic_target="mse(ys[-1], flip(sin(2 y0), -1))")  # fmt: skip


def recipe_hash() -> str:
    blob = json.dumps(RECIPE, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def recipe_text() -> str:
    """The recipe in words (report and `advise` say it)."""
    r = RECIPE
    return (
        f"direct backprop through torchdiffeq.odeint ({r['solver']}, rtol = atol = {r['atol']:g}), Adam at "
        f"lr {r['lr']:g}, full batch; the problem's own task, else the regression target sin(2 y0) reversed"
    )


class TrainingFailed(RuntimeError):
    """The recipe's loss went non-finite: these weights do not exist (the cases become error rows)."""


def trained_path(case: Case, cache_dir: str | Path | None = None) -> Path:
    from .measure import reference_dir

    stem = case.problem
    if ":" in case.problem:
        from ..define.user_problems import cache_name

        stem = cache_name(case.problem)
    device = "" if case.device == "cpu" else "-" + case.device.replace(":", "")
    start = f"-u{case.weights}" if case.weights else ""  # trained from a user's weights
    name = f"{stem}-w{case.width}-b{case.batch}-s{case.seed}-{case.dtype}{device}-t{case.train_steps}{start}"
    return reference_dir(cache_dir) / f"trained-{name}-r{recipe_hash()}.npz"


def weights_path(sha: str, cache_dir: str | Path | None = None) -> Path:
    """Where a user's weights file (`import_weights`) lies in the references folder, by its content hash."""
    from .measure import reference_dir

    return reference_dir(cache_dir) / f"weights-{sha}.pt"


class WeightsError(GridSpecError):
    """A user's weights file that cannot be loaded into the model; one line naming the fix (the CLI: exit 2)."""


def read_weights(path: str | Path) -> dict:
    """A state_dict saved with `torch.save(func.state_dict(), path)` (tensors only: loaded with weights_only)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(
            f"--weights {path}: no such file; give the path of torch.save(func.state_dict(), ...)"
        ) from None
    except Exception as exc:  # noqa: BLE001 -- a pickle, a truncated file, another format: one line
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise WeightsError(f"--weights {path}: not a state_dict torch.load can read ({why}); save it with "
                           "torch.save(func.state_dict(), path)") from None  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict of tensors; save "
                           "func.state_dict(), not the module")  # fmt: skip
    return state


def load_strict(func, state: dict, where: str) -> None:
    """`func.load_state_dict(state, strict=True)` cast to func's dtype and device; a mismatch is one line."""
    ref = func.state_dict()
    missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    shapes = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k} is {tuple(state[k].shape)}, the model's {tuple(ref[k].shape)}")
        raise WeightsError(f"{where}: the weights do not fit the model ({'; '.join(parts)}); save func.state_dict() "
                           "of the model make() builds at this width")  # fmt: skip
    func.load_state_dict({k: v.to(device=ref[k].device, dtype=ref[k].dtype) for k, v in state.items()}, strict=True)


def import_weights(path: str | Path, case: Case, cache_dir: str | Path) -> str:
    """Check that the weights at `path` load strictly into the case's model and copy them into `cache_dir` by
    content hash (workers load them from there): -> the hash, the case's `weights` field."""
    import shutil

    from ..define.problems import get_problem

    state = read_weights(path)
    inst = get_problem(case.problem).build(width=case.width, batch=case.batch, dtype=case.dtype, device="cpu",
                                           seed=case.seed)  # fmt: skip
    load_strict(inst.func, state, f"--weights {path}")
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    dest = weights_path(sha, cache_dir)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    return sha


def start_state(case: Case, cache_dir: str | Path | None = None) -> dict | None:
    """The weights a case starts from before any step: the user's (`case.weights`), else None (the seed's)."""
    if not case.weights:
        return None
    path = weights_path(case.weights, cache_dir)
    if not path.exists():
        raise WeightsError(f"{path} is missing (weights {case.weights} of case {case.case_id}); pass --weights again")
    return read_weights(path)


def trained_state(case: Case, cache_dir: str | Path | None = None) -> dict:
    """{name: tensor} of `func`'s state_dict after the case's `train_steps` from its start (the seed's initial
    weights or the user's), cached; trained here if absent. No steps: the user's weights themselves."""
    import torch

    if not case.train_steps:
        return start_state(case, cache_dir)
    path = trained_path(case, cache_dir)
    if not path.exists():
        state, _ = train(case, cache_dir=cache_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in state.items()})
        os.replace(tmp, path)  # atomic: a concurrent or killed writer never leaves half a file
    with np.load(path) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def apply_trained(func, case: Case, cache_dir: str | Path | None = None) -> None:
    """Load the case's weights (trained, or the user's) into `func` (strict: every key, every shape)."""
    load_strict(func, trained_state(case, cache_dir), f"{case.problem} (weights of case {case.case_id})")


def synthetic_target(y0):
    """The regression target of problems without a training task: a fixed nonlinear map of y0."""
    import torch

    return torch.sin(2.0 * y0).flip(-1)


def training_loss(problem, inst):
    """The recipe's loss of `ys` for this problem instance (see the module docstring)."""
    import torch

    if inst.target is not None:
        if callable(inst.target):
            return inst.target
        target = inst.target.detach()
        return lambda ys: torch.mean((ys[-1] - target) ** 2)
    if getattr(problem, "loss_is_task", False):
        return inst.loss
    target = synthetic_target(inst.y0.detach())
    return lambda ys: torch.mean((ys[-1] - target) ** 2)


def train(case: Case, steps: int | None = None, cache_dir: str | Path | None = None) -> tuple[dict, list[float]]:
    """Run the recipe for `steps` (default the case's `train_steps`) from the case's start (`start_state`):
    -> (func's state_dict, loss per step)."""
    import torch

    from ..define.problems import get_problem

    steps = case.train_steps if steps is None else steps
    torch.set_num_threads(case.threads)
    torch.manual_seed(case.seed)
    problem = get_problem(case.problem)
    inst = problem.build(width=case.width, batch=case.batch, dtype=case.dtype, device=case.device, seed=case.seed)
    start = start_state(case, cache_dir)
    if start is not None:
        load_strict(inst.func, start, f"{case.problem} (weights {case.weights})")
    return train_instance(inst, training_loss(problem, inst), steps, where=f"{case.problem} w={case.width}")


def train_instance(inst, loss_fn, steps: int, *, where: str = "") -> tuple[dict, list[float]]:
    """The recipe on a built instance (its func trained in place): -> (state_dict, loss per step)."""
    import torch
    import torchdiffeq

    opt = torch.optim.Adam(inst.func.parameters(), lr=RECIPE["lr"])
    y0 = inst.y0.detach()
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        ys = torchdiffeq.odeint(inst.func, y0, inst.t, method=RECIPE["solver"], rtol=RECIPE["rtol"],
                                atol=RECIPE["atol"])  # fmt: skip
        loss = loss_fn(ys)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingFailed(f"{where}: the training recipe's loss is {value} at step {step}; fewer train_steps")
        losses.append(value)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in inst.func.state_dict().items()}, losses
