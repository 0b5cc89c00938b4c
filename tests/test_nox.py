"""noxfile.py: the sessions exist under their (dashed) names, bench-gpu skips cleanly without CUDA and
installs nothing, and the pytest-benchmark micro-benchmarks run (disabled, as a smoke check)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SESSIONS = {"tests", "lint", "bench", "bench-gpu", "asv", "report", "profile", "microbench", "docs"}


@pytest.fixture(scope="module")
def noxfile():
    nox = pytest.importorskip("nox")
    spec = importlib.util.spec_from_file_location("noxfile_under_test", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, nox


class Skipped(Exception):
    pass


class FakeSession:
    """Records what a session function asks nox to do."""

    def __init__(self, posargs=()):
        self.posargs = list(posargs)
        self.calls = []

    def skip(self, msg):
        raise Skipped(msg)

    def error(self, msg):
        raise RuntimeError(msg)

    def install(self, *args, **kw):
        self.calls.append(("install", args))

    def run(self, *args, **kw):
        self.calls.append(("run", args, kw.get("env")))


def test_sessions_registered(noxfile):
    _, nox = noxfile
    assert SESSIONS <= set(nox.registry.get())


def test_bench_gpu_skips_without_cuda(noxfile, monkeypatch):
    module, _ = noxfile
    monkeypatch.setattr(module, "cuda_unavailable", lambda: "torch.cuda.is_available() is False")
    session = FakeSession()
    with pytest.raises(Skipped, match="CUDA not available: torch.cuda.is_available"):
        module.bench_gpu.func(session) if hasattr(module.bench_gpu, "func") else module.bench_gpu(session)
    assert session.calls == []


def test_cuda_probe_here(noxfile):
    module, _ = noxfile
    import torch

    why = module.cuda_unavailable()
    assert (why is None) == torch.cuda.is_available()


def test_bench_gpu_with_cuda_runs_gqbench_and_asv_for_the_commit(noxfile, monkeypatch):
    module, _ = noxfile
    pytest.importorskip("asv")
    monkeypatch.setattr(module, "cuda_unavailable", lambda: None)
    session = FakeSession()
    func = getattr(module.bench_gpu, "func", module.bench_gpu)
    func(session)
    assert not any(c[0] == "install" for c in session.calls), "bench-gpu must not install (offline GPU boxes)"
    runs = [c[1] for c in session.calls]
    assert runs[0][:6] == (sys.executable, "-m", "gqbench", "run", "--preset", "gpu")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    asv_run = next(r for r in runs if r[2:4] == ("asv", "run"))
    assert "--python=same" in asv_run and f"--set-commit-hash={sha}" in asv_run
    assert all(
        c[2] == {"GQBENCH_ASV_DEVICES": "cuda"} for c in session.calls if c[1][2] == "asv" and c[1][3] != "publish"
    )


def test_microbench_smoke():
    """One micro-benchmark, disabled (a single call), as the plain pytest would run it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/microbench/test_microbench.py::test_gradient[torch_gq-10]",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-disable",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_bench_gpu_shard_runs_its_part_and_asv_once(noxfile, monkeypatch):
    """A CI matrix: each runner passes --shard to gqbench run; only shard 1 records the asv benchmarks."""
    module, _ = noxfile
    pytest.importorskip("asv")
    monkeypatch.setattr(module, "cuda_unavailable", lambda: None)
    func = getattr(module.bench_gpu, "func", module.bench_gpu)
    for shard, asv_runs in (("1/4", True), ("2/4", False)):
        session = FakeSession(["reports/gpu-x", "--shard", shard])
        func(session)
        runs = [c[1] for c in session.calls]
        assert runs[0][2:] == ("gqbench", "run", "--preset", "gpu", "--out", "reports/gpu-x", "--report", "--shard",
                               shard)  # fmt: skip
        assert any(r[2:4] == ("asv", "run") for r in runs) == asv_runs


def test_docs_session_builds_strict_or_serves(noxfile):
    """`nox -s docs` installs the [docs] extra and builds the site with --strict; `-- serve` serves it."""
    module, _ = noxfile
    func = getattr(module.docs, "func", module.docs)
    session = FakeSession()
    func(session)
    assert session.calls[0][0] == "install" and ".[docs]" in session.calls[0][1]
    assert session.calls[1][1] == ("mkdocs", "build", "--strict", "--site-dir", "site")
    session = FakeSession(["serve"])
    func(session)
    assert session.calls[1][1] == ("mkdocs", "serve", "--strict")
