"""Environment metadata stored beside the results: what ran, where, with which versions."""

from __future__ import annotations

import ast
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchdiffeq", "numpy", "pandas", "pyarrow", "jax", "jaxlib", "diffrax", "equinox", "gqbench")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[dict]:
    """From nvidia-smi, so the runner process need not import torch (or initialise CUDA)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        name, driver, mem = (x.strip() for x in line.split(",")[:3])
        gpus.append(dict(name=name, driver=driver, memory=mem))
    return gpus


def environment(threads: int | None = None) -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        git_sha=_git("rev-parse", "HEAD"),
        git_dirty=bool(status) if status is not None else None,
        python=sys.version.split()[0],
        platform=platform.platform(),
        hostname=platform.node(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        threads=threads,
        gpus=_gpus(),
        versions=versions,
        gq_defaults=gq_defaults(),
    )


# odeint_adjoint_gq's keyword defaults that decide what "torch_gq" with unset options means.
_GQ_KEYS = ("quadrature", "gtol", "quad_order", "quad_rtol", "quad_atol", "backward_state", "warm_start", "quad_batch")


def gq_defaults() -> dict:
    """The defaults of `impls.odeint_adjoint_gq` as written in its source (read with `ast`: no torch import)."""
    spec = importlib.util.find_spec("impls")
    if spec is None or spec.origin is None:
        return {}
    src = Path(spec.origin).with_name("_gq.py")
    try:
        tree = ast.parse(src.read_text())
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "odeint_adjoint_gq":
            args = node.args.kwonlyargs
            vals = {a.arg: d for a, d in zip(args, node.args.kw_defaults) if d is not None}
            out = {k: ast.literal_eval(vals[k]) for k in _GQ_KEYS if k in vals}
            out["quadrature"] = out.get("quadrature") or "adaptive"  # None picks the adaptive rule
            return {k: v for k, v in out.items() if v is not None}
    return {}
