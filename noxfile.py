"""nox sessions: `nox -s tests lint`, `nox -s bench`, `nox -s bench-gpu`, `nox -s asv -- HEAD~5..HEAD`,
`nox -s report`, `nox -s profile`, `nox -s microbench`, `nox -s docs [-- serve]`. See docs/scale-out.md.

CPU sessions install with `-c constraints.txt` (the CPU torch==2.13.0); virtualenvs are reused.
`bench-gpu` installs nothing: it runs in the interpreter that runs nox, whose CUDA torch, asv and
plotly the GPU runner brings (wheels work offline).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = ("-c", "constraints.txt")
PYTHON = "3.11"
ASV_REQ = ("asv==0.6.*", "virtualenv")

nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = False


def _install(session: nox.Session, extras: str, *more: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]", *more)


def _sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "nogit"
    return out.stdout.strip() or "nogit"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The README's test command, in a fresh venv (`.ci/run` does the same)."""
    _install(session, "bench,jax,test,sde,ray")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the project."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    # Markdown code blocks (ruff formats them too) are the README authors' to format.
    session.run("ruff", "format", "--check", "--extend-exclude", "*.md", ".")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The main job: the default preset and its report (reports/default/index.html)."""
    _install(session, "bench,jax")
    out = session.posargs[0] if session.posargs else "reports/default"
    session.run("gqbench", "run", "--preset", "default", "--out", out, "--report")


def cuda_unavailable(python: str = sys.executable) -> str | None:
    """Why this interpreter cannot run the CUDA preset, or None when it can."""
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    try:
        rc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not ask torch about CUDA ({exc})"
    if rc == 3:
        return "torch.cuda.is_available() is False in this interpreter (a CPU torch, or no GPU/driver visible)"
    if rc != 0:
        return f"torch is not importable by {python}"
    return None


def _bench_gpu_args(posargs: list[str]):
    """`nox -s bench-gpu -- [OUT] [--shard K/N] [--baseline DIR] [--threshold 0.1]`."""
    import argparse

    p = argparse.ArgumentParser(prog="nox -s bench-gpu --")
    p.add_argument("out", nargs="?", default="reports/gpu")
    p.add_argument("--shard", metavar="K/N", help="this runner's part of the grid (gqbench merge joins the parts)")
    p.add_argument("--baseline", help="a stored results folder: fail on regressions against it (gqbench compare)")
    p.add_argument("--threshold", type=float, default=0.1)
    return p.parse_args(posargs)


@nox.session(name="bench-gpu", venv_backend="none")
def bench_gpu(session: nox.Session) -> None:
    """CUDA preset + report + asv results for this commit, in nox's own interpreter (skips without CUDA).

    Nothing is installed: a GPU runner brings its CUDA torch, asv and plotly (wheels work offline)."""
    why = cuda_unavailable()
    if why:
        session.skip(f"CUDA not available: {why}; bench-gpu needs a CUDA torch on a machine with a GPU")
    py = sys.executable
    opts = _bench_gpu_args(session.posargs)
    shard = ["--shard", opts.shard] if opts.shard else []
    session.run(py, "-m", "gqbench", "run", "--preset", "gpu", "--out", opts.out, "--report", *shard, external=True)
    if opts.baseline:
        # Fails the session (exit 1) when a case's interval lies wholly beyond the threshold.
        session.run(py, "-m", "gqbench", "compare", opts.out, opts.baseline, "--threshold", str(opts.threshold),
                    external=True)  # fmt: skip
    if opts.shard and not opts.shard.strip().startswith("1/"):
        return  # asv's benchmarks are one small set: a matrix records them once, on shard 1
    try:
        import asv  # noqa: F401
    except ImportError:
        session.error(f"asv is not installed in {py}; pip install 'asv==0.6.*' (a wheel works offline), then rerun")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    env = {"GQBENCH_ASV_DEVICES": "cuda"}
    session.run(py, "-m", "asv", "machine", "--yes", external=True, env=env)
    session.run(
        py,
        "-m",
        "asv",
        "run",
        "--python=same",
        f"--set-commit-hash={sha.stdout.strip()}",
        "--show-stderr",
        external=True,
        env=env,
    )
    session.run(py, "-m", "asv", "publish", external=True)


@nox.session(python=PYTHON)
def asv(session: nox.Session) -> None:
    """asv over a commit range (default HEAD~3..HEAD), then the HTML into reports/asv.

    `nox -s asv -- main..mybranch`; extra asv flags after the range pass through."""
    session.install(*CONSTRAINTS, *ASV_REQ)
    args = list(session.posargs) or ["HEAD~3..HEAD"]
    if not Path(os.path.expanduser("~/.asv-machine.json")).exists():
        session.run("asv", "machine", "--yes")
    session.run("asv", "run", "--show-stderr", *args)
    session.run("asv", "publish")


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Rebuild the HTML: gqbench's report per results folder (default reports/default), and asv's.

    asv's pages go to reports/asv when .asv/results exists."""
    _install(session, "bench")
    for folder in session.posargs or ["reports/default"]:
        if (Path(folder) / "results.parquet").exists():
            session.run("gqbench", "report", folder)
        else:
            session.warn(f"{folder}/results.parquet not found; run `nox -s bench` first")
    if (ROOT / ".asv" / "results").is_dir():
        session.install(*CONSTRAINTS, *ASV_REQ)
        session.run("asv", "publish")


@nox.session(python=PYTHON)
def profile(session: nox.Session) -> None:
    """`gqbench profile` (torch.profiler/jax.profiler traces) when this gqbench has it."""
    _install(session, "bench,jax")
    probe = session.run("gqbench", "profile", "--help", silent=True, success_codes=[0, 1, 2])
    if not probe or "invalid choice" in probe:
        session.skip("this gqbench has no `profile` command yet (the profiling issue adds it)")
    session.run("gqbench", "profile", *session.posargs)


@nox.session(python=PYTHON)
def microbench(session: nox.Session) -> None:
    """pytest-benchmark micro-benchmarks, compared with the last saved run when there is one.

    JSON into reports/microbench/<sha>.json; saved runs in reports/microbench/storage."""
    _install(session, "bench,jax,test,sde,ray")
    folder = ROOT / "reports" / "microbench"
    storage = folder / "storage"
    args = [
        "pytest",
        "benchmarks/microbench",
        "--benchmark-enable",
        f"--benchmark-json={folder / (_sha() + '.json')}",
        f"--benchmark-storage=file://{storage}",
        "--benchmark-autosave",
        "--benchmark-columns=min,median,iqr,rounds",
        "--benchmark-sort=name",
    ]
    if any(storage.rglob("*.json")):
        args.append("--benchmark-compare")
    folder.mkdir(parents=True, exist_ok=True)
    session.run(*args, *session.posargs)


def docs_command(posargs: list[str]) -> list[str]:
    """`nox -s docs` -> mkdocs build --strict into site/; `nox -s docs -- serve [ADDR]` serves it while you edit."""
    if posargs and posargs[0] == "serve":
        return ["mkdocs", "serve", "--strict", *(["--dev-addr", posargs[1]] if len(posargs) > 1 else [])]
    return ["mkdocs", "build", "--strict", "--site-dir", "site", *posargs]


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml), offline. The API pages are read from the source (griffe, no import)."""
    _install(session, "docs")
    session.run(*docs_command(session.posargs), env={"NO_MKDOCS_2_WARNING": "1"})
