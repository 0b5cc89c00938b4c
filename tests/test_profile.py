"""`gqbench profile`: a real profile of torch_gq and torch_adjoint at width 32 (each case in its own
process) gives traces that TensorBoard's PyTorch Profiler plugin lists over HTTP, a phase
breakdown that adds up, and the report's "where the time goes" figure. ~40 s on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from gqbench import Case
from gqbench.cli import main
from gqbench.measurement.profile import load_phases
from gqbench.report.figures import fig_phases
from gqbench.report.html import render
from gqbench.results.tables import frame

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARGS = ["--problem", "workload_l", "--width", "32", "--batch", "16", "--rtol", "1e-3", "--steps", "1"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles")
    rc = main(["profile", "--method", "torch_gq", "--method", "torch_adjoint", *ARGS, "--out", str(out)])
    assert rc == 0
    cases = {json.loads(p.read_text())["method"]: p.parent.name for p in out.glob("*/case.json")}
    assert set(cases) == {"torch_gq", "torch_adjoint"}
    return out, cases


def test_profile_writes_traces_and_a_breakdown_that_adds_up(profiled):
    out, cases = profiled
    gq = json.loads((out / cases["torch_gq"] / "phases.json").read_text())
    adj = json.loads((out / cases["torch_adjoint"] / "phases.json").read_text())
    for res in (gq, adj):
        assert len(res["trace_files"]) == 1 and res["trace_files"][0].endswith(".pt.trace.json")
        trace = json.loads((out / res["case_id"] / res["trace_files"][0]).read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"gqbench::forward", "gqbench::backward"} <= names
        assert any(e.get("name") == "[memory]" for e in trace["traceEvents"])  # profile_memory=True
        assert sum(r["share"] for r in res["leaves"]) == pytest.approx(1.0)
        assert res["nfe_fwd"] > 0 and res["memory_snapshot"] is None  # CPU: no CUDA snapshot
    phases = {r["phase"]: r for r in gq["phases"]}
    assert {"gq::forward_solve", "gq::backward_solve", "gq::quadrature_vjp", "gq::accumulate"} <= set(phases)
    assert phases["gq::backward_solve"]["ms"] < phases["backward"]["ms"]
    assert {r["phase"] for r in adj["leaves"]} == {"forward", "backward"}
    assert any(op["name"].startswith("aten::") for op in adj["top_ops"]["backward"])


def test_breakdown_figure_in_the_report(profiled):
    out, _ = profiled
    phases = load_phases(out)
    assert fig_phases(phases) is not None
    case = Case("torch_gq", "workload_l", 32, 16, rtol=1e-3, atol=1e-3, gtol=0.1)
    row = dict(case.to_dict(), case_id=case.case_id, label=case.label, repeat=0, fwd_s=0.1, bwd_s=0.2, status="ok")
    page = render(frame([row]), phases=phases, profiles_root=out)
    assert 'id="fig-phases"' in page and "gq::quadrature_vjp" in page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_tensorboard_profiler_plugin_lists_the_runs(profiled):
    out, cases = profiled
    missing = [m for m in ("tensorboard", "torch_tb_profiler") if not _importable(m)]
    if missing:
        why = f"{', '.join(missing)} not installed (pip install -e '.[profile]')"
        if IN_CI:
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler"
    try:
        runs, deadline = {}, time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            try:
                runs = _get(f"{base}/runs")
            except OSError:
                runs = {}
            if set(cases.values()) <= set(runs.get("runs", [])) and not runs.get("loading", True):
                break
            time.sleep(1)
        assert set(cases.values()) <= set(runs.get("runs", [])), runs
        for run in cases.values():
            views = _get(f"{base}/views?run={run}")
            assert {"Overview", "Operator", "Trace", "Memory"} <= set(views), views
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_profile_cli_selects_cases_from_a_preset(capsys):
    assert main(["profile", "--preset", "default", "--method", "torch_gq", "--width", "2000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if "workload_l" in line]
    assert listed and all("torch_gq" in line and "w=2000" in line for line in listed)
    assert f"{len(listed)} cases" in out
    assert main(["profile", "--preset", "default", "--method", "torch_gq", "--width", "7", "--dry-run"]) == 2
    assert main(["profile", "--width", "32"]) == 2  # no method
    assert main(["profile", "--method", "torch_gq", "--width", "32", "--dry-run"]) == 0


def test_jax_case_goes_through_jax_profiler(tmp_path):
    if importlib.util.find_spec("diffrax") is None:
        pytest.skip("diffrax not installed (pip install -e '.[jax]')")
    from gqbench.measurement.profile import profile_cases

    case = Case("jax_gq", "workload_l", 16, 8, rtol=1e-3, atol=1e-3, gtol=0.1, backward_state="backsolve")
    (res,) = profile_cases([case], tmp_path, steps=1, warmup=1, log=lambda _: None)  # fresh process: XLA threads set
    assert res["status"] == "ok" and res["backend"] == "jax", res
    assert any(f.endswith("perfetto_trace.json.gz") for f in res["jax_trace_files"])
    assert {r["phase"] for r in res["leaves"]} == {"forward", "backward"}
    assert load_phases(tmp_path)["method"].eq("jax_gq").all()
