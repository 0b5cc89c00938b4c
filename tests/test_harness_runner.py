"""Runner, worker and measure: exact NFE from stubs, failure rows, kill-and-resume, schema."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import gqbench._testing as stubs
from gqbench import COLUMNS, Case, RunSettings, load_results, measure, parse_spec, run_grid
from gqbench.measurement.measure import Skip

PLUGIN = {"GQBENCH_PLUGINS": "gqbench._testing"}


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    monkeypatch.setenv("GQBENCH_PLUGINS", "gqbench._testing")  # worker processes register the stubs too


def stub_case(kind="ok", width=3, **kw):
    return Case(f"stub_{kind}", "linear", width, 2, threads=1, **kw)


def test_measure_in_process_exact_counts():
    rows = measure(stub_case(width=5), repeats=3, warmup=2)
    assert [r["repeat"] for r in rows] == [0, 1, 2]
    assert all(r["nfe_fwd"] == 5 and r["nfe_bwd"] == 11 and r["status"] == "ok" for r in rows)
    assert all(stubs.FWD_S <= r["fwd_s"] < stubs.FWD_S + 0.5 for r in rows)
    assert all(stubs.BWD_S <= r["bwd_s"] < stubs.BWD_S + 0.5 for r in rows)
    assert all(np.isnan(r["grad_rel_err"]) for r in rows)  # stubs have no reference


def test_page_faults_are_counted_per_pass():
    """A backward that touches a freshly mapped 64 MiB block faults once per 4 KiB page; the sleeping
    forward hardly at all; and the sleeping stub_ok backward neither."""
    pages = stubs.FRESH_BYTES // 4096
    fresh = measure(stub_case("fresh"), repeats=3, warmup=1)
    assert all(pages <= r["bwd_page_faults"] < 1.5 * pages for r in fresh), [r["bwd_page_faults"] for r in fresh]
    assert all(r["fwd_page_faults"] < pages / 10 for r in fresh)
    assert all(r["bwd_page_faults"] < pages / 10 for r in measure(stub_case(), repeats=3, warmup=1))


def test_run_grid_records_ok_and_every_failure(tmp_path):
    cases = [stub_case("ok", 3), stub_case("ok", 4)] + [stub_case(k) for k in stubs.KINDS if k != "ok"]
    cases.append(stub_case("ok", device="cuda:0") if not _cuda() else stub_case("ok", 6))
    df = run_grid(cases, tmp_path, settings=RunSettings(repeats=2, warmup=1, timeout=20), progress=False)
    by = {cid: g for cid, g in df.groupby("case_id")}
    for width in (3, 4):
        ok = by[stub_case("ok", width).case_id]
        assert len(ok) == 2 and list(ok["repeat"]) == [0, 1]
        assert (ok["nfe_fwd"] == width).all() and (ok["nfe_bwd"] == 2 * width + 1).all()
        assert (ok["status"] == "ok").all() and (ok["error"] == "").all()
        assert (ok["bwd_s"] >= stubs.BWD_S).all()
    expect = {
        "crash": ("error", "stub crashed on purpose"),
        "nan": ("nan", "non-finite"),
        "hang": ("timeout", "timeout"),
        "oom": ("oom", "MemoryError"),
        "max_steps": ("max_steps", "max_num_steps"),
        "abort": ("error", "signal 6"),
    }
    for kind, (status, text) in expect.items():
        rows = by[stub_case(kind).case_id]
        assert set(rows["status"]) == {status}, (kind, rows["error"].tolist())
        assert rows["error"].str.contains(text).all(), (kind, rows["error"].tolist())
    if not _cuda():
        skipped = by[stub_case("ok", device="cuda:0").case_id]
        assert list(skipped["status"]) == ["skipped"] and "cuda" in skipped["error"].iloc[0]
    # ok: 2 repeats x 2 cases; nan: its 2 measured repeats; 5 other failures and the skip: 1 row each
    assert len(df) == 4 + 2 + 5 + (1 if not _cuda() else 2)
    env = json.loads((tmp_path / "environment.json").read_text())
    assert {"git_sha", "versions", "cpu_model", "threads", "gpus", "date", "settings"} <= set(env)


def _cuda():
    import torch

    return torch.cuda.is_available()


def test_results_schema(tmp_path):
    run_grid([stub_case("ok"), stub_case("crash")], tmp_path, settings=RunSettings(repeats=2, warmup=0), progress=False)
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    required = (
        "case_id method problem width batch rtol atol gtol quad_order device dtype repeat fwd_s bwd_s "
        "peak_mem_bytes nfe_fwd nfe_bwd grad_rel_err status error"
    ).split()
    assert set(required) <= set(df.columns)
    assert df["fwd_s"].dtype == "float64" and str(df["width"].dtype) == "Int64"
    assert df.equals(load_results(tmp_path))


def test_real_methods_in_process_match_closed_form(tmp_path):
    for method in ("torch_direct", "torch_adjoint", "torch_seminorm", "torch_gq"):
        case = Case(method, "linear", 4, 3, rtol=1e-8, atol=1e-8, threads=1, gtol=0.1 if method == "torch_gq" else None)
        rows = measure(case, repeats=1, warmup=0, reference_dir=tmp_path)
        assert rows[0]["status"] == "ok" and rows[0]["grad_rel_err"] < 1e-5, (method, rows[0])
        assert rows[0]["nfe_fwd"] > 0 and (rows[0]["nfe_bwd"] > 0) == (method != "torch_direct")


@pytest.mark.parametrize("problem", ["workload_l", "g1d", "spheres", "sines"])
def test_problems_run_with_reference(problem, tmp_path):
    case = Case("torch_gq", problem, 8, 4, rtol=1e-7, atol=1e-7, quad_order=8, backward_state="backsolve", threads=1)
    rows = measure(case, repeats=1, warmup=0, reference_dir=tmp_path)
    assert rows[0]["status"] == "ok" and rows[0]["grad_rel_err"] < 1e-3, rows[0]
    assert rows[0]["quad_nodes"] > 0


def test_cuda_case_skips_without_gpu():
    if _cuda():
        pytest.skip("has a GPU")
    with pytest.raises(Skip, match="cuda"):
        measure(Case("torch_gq", "linear", 4, 2, device="cuda", gtol=0.1), repeats=1)


@pytest.mark.cuda
@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_cuda_measure():
    rows = measure(Case("torch_gq", "workload_l", 32, 16, device="cuda", gtol=0.1), repeats=2, warmup=1)
    assert all(r["status"] == "ok" and r["peak_mem_bytes"] > 0 for r in rows)


def _run_killed_after(tmp_path, spec_text: str, n_cases: int, env: dict) -> tuple[list[str], Path]:
    """`gqbench run` of `spec_text` in a subprocess, SIGKILLed (runner and workers) once `n_cases`
    case files are written: -> (the command, to run it again; the output folder)."""
    spec = tmp_path / "spec.toml"
    spec.write_text(spec_text)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gqbench", "run", "--grid", str(spec), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((out / "cases").glob("*.json"))) < n_cases and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return cmd, out


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    env = dict(os.environ, **PLUGIN)
    spec = ('[run]\nrepeats = 2\nwarmup = 0\n[axes]\nmethod = ["stub_ok"]\nproblem = ["linear"]\n'
            "width = [1, 2, 3, 4, 5, 6]\nbatch = [2]\nthreads = [1]\n")  # fmt: skip
    cmd, out = _run_killed_after(tmp_path, spec, 2, env)  # the runner and its worker, mid-grid
    done_before = {p.stem for p in (out / "cases").glob("*.json")}
    assert 2 <= len(done_before) < 6
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}
    subprocess.run(cmd, env=env, check=True, timeout=120)
    df = pd.read_parquet(out / "results.parquet")
    cases = parse_spec(
        {
            "run": {},
            "axes": {
                "method": ["stub_ok"],
                "problem": ["linear"],
                "width": [1, 2, 3, 4, 5, 6],
                "batch": [2],
                "threads": [1],
            },
        }
    ).cases
    assert sorted(df["case_id"].unique()) == sorted(c.case_id for c in cases)
    assert len(df) == 12 and not df.duplicated(["case_id", "repeat"]).any()
    assert sorted(df.groupby("case_id")["nfe_fwd"].first()) == [1, 2, 3, 4, 5, 6]
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # finished cases were not rerun
    env_runs = json.loads((out / "environment.json").read_text())["runs"]
    assert env_runs[-1]["already_done"] == len(done_before)


def test_a_group_cut_short_runs_again_whole(tmp_path):
    """Killed after one case of a comparison group was written: the re-run times the whole group again
    (the other case's rounds must be paired with this one's, not with rounds of the killed run)."""
    hold = tmp_path / "hold"
    hold.touch()
    env = dict(os.environ, **PLUGIN, **{stubs.HOLD_ENV: str(hold)})
    spec = ('[run]\nrepeats = 3\nwarmup = 0\n[axes]\nmethod = ["stub_ok", "stub_hold"]\nproblem = ["linear"]\n'
            "width = [3]\nbatch = [2]\nthreads = [1]\n")  # fmt: skip
    cmd, out = _run_killed_after(tmp_path, spec, 1, env)  # stub_ok's file is written, stub_hold waits in "finish"
    (first,) = (out / "cases").glob("*.json")
    mtime = first.stat().st_mtime_ns
    hold.unlink()
    subprocess.run(cmd, env=env, check=True, timeout=120)
    df = pd.read_parquet(out / "results.parquet")
    assert sorted(df["method"].unique()) == ["stub_hold", "stub_ok"] and (df["status"] == "ok").all()
    assert len(df) == 6 and first.stat().st_mtime_ns != mtime  # stub_ok was timed again, beside stub_hold
    assert json.loads((out / "environment.json").read_text())["runs"][-1]["already_done"] == 0


# ----------------------------------------------------------------------------- paired rounds


def test_compared_methods_alternate_round_by_round(tmp_path, monkeypatch):
    """Cases differing only in the method form one group; their timed calls alternate, the order
    rotating each round, under the default allocator even when the parent sets MALLOC_MMAP_THRESHOLD_."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(stubs.TRACE_ENV, str(trace))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    cases = [stub_case("ok"), stub_case("quad"), stub_case("crash"), stub_case("ok", width=5)]
    from gqbench.execute.runner import comparison_groups

    assert [len(g) for g in comparison_groups(cases)] == [3, 1]
    settings = RunSettings(repeats=3, warmup=1, rewarm=0, timeout=60)
    df = run_grid(cases, tmp_path / "out", settings=settings, progress=False)
    calls = [line.split() for line in trace.read_text().splitlines()]
    assert {env for _, env, _, _ in calls} == {"-"}  # timed (and warm-up) calls never see the allocator setting
    spans = sorted((float(a), float(b)) for _, _, a, b in calls)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "two calls overlapped"
    # warm-ups one at a time, then rounds (ok, quad), (quad, ok), (ok, quad); the crash case is out
    group = [m for m, *_ in calls if m in ("stub_ok", "stub_quad")][:8]
    assert group == ["stub_ok", "stub_quad"] + ["stub_ok", "stub_quad", "stub_quad", "stub_ok", "stub_ok", "stub_quad"]
    ok = df[(df["method"] == "stub_ok") & (df["width"] == 3)]
    assert sorted(ok["round"]) == [0, 1, 2] and (ok["repeat"] == ok["round"]).all()
    assert df[df["method"] == "stub_crash"]["status"].tolist() == ["error"]


def test_each_timed_call_follows_an_untimed_one_of_its_method(tmp_path, monkeypatch):
    """rewarm=1 (the default): in every round a method's timed call comes right after its own untimed
    call, never first after another method's; the runner and the one-process alternation alike."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(stubs.TRACE_ENV, str(trace))
    cases = [stub_case("ok"), stub_case("quad")]
    df = run_grid(cases, tmp_path / "out", settings=RunSettings(repeats=2, warmup=1, timeout=60), progress=False)
    calls = [line.split()[0] for line in trace.read_text().splitlines()]
    # warm-ups; round 0: ok, ok, quad, quad; round 1: quad, quad, ok, ok; then each memory call
    assert calls == ["stub_ok", "stub_quad"] + ["stub_ok"] * 2 + ["stub_quad"] * 4 + ["stub_ok"] * 3 + ["stub_quad"]
    assert df.groupby("method")["round"].apply(sorted).tolist() == [[0, 1]] * 2
    from gqbench.measurement.launch import run_to_end

    trace.unlink()
    job = dict(kind="alternate", case=cases[0].to_dict(), cases=[c.to_dict() for c in cases], warmup=1, repeats=2,
               rewarm=1)  # fmt: skip
    rows = run_to_end(job, cases[0], tmp_path / "alt.log", timeout=60)["rows"]
    calls = [line.split()[0] for line in trace.read_text().splitlines()]
    assert calls == ["stub_ok", "stub_quad"] + ["stub_ok"] * 2 + ["stub_quad"] * 4 + ["stub_ok"] * 2
    assert [r["method"] for r in rows] == ["stub_ok", "stub_quad", "stub_quad", "stub_ok"]


def test_worker_env_drops_the_allocator_setting(monkeypatch):
    from gqbench.measurement.launch import worker_env

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    env = worker_env(stub_case("ok").with_(threads=3))
    assert "MALLOC_MMAP_THRESHOLD_" not in env and env["OMP_NUM_THREADS"] == "3"


def test_paired_speedup_of_stubs_with_known_times(tmp_path):
    """stub_quad_half sleeps half as long as stub_ok: run side by side, the speed-up is 2 with a 95%
    interval that excludes 1, from samples paired by round."""
    from gqbench.results.ratios import paired_speedups

    cases = [stub_case("ok"), stub_case("quad_half")]
    df = run_grid(cases, tmp_path, settings=RunSettings(repeats=5, warmup=1, timeout=60), progress=False)
    assert df.groupby("method")["round"].apply(sorted).tolist() == [[0, 1, 2, 3, 4]] * 2
    (r,) = paired_speedups(df, gq_methods=("stub_quad_half",)).itertuples()
    assert r.gq == "stub_quad_half" and r.baseline == "stub_ok" and r.rounds == 5
    assert 1.7 < r.bwd_lo <= r.speedup_bwd <= r.bwd_hi < 2.3 and not r.bwd_includes_one
    assert 1.7 < r.speedup_total < 2.3 and not r.total_includes_one


def test_alternate_job_times_a_group_in_one_fresh_process(tmp_path):
    """benchmarks/alternate.py's worker job: both stubs prepared in one worker, timed in an order
    rotating each round, with the same known speed-up of 2 as the runner's separate processes; a
    group that fails is a failure row, not a lost run."""
    from gqbench.measurement.launch import run_to_end
    from gqbench.results.ratios import paired_speedups

    group = [stub_case("ok"), stub_case("quad_half")]
    job = dict(kind="alternate", case=group[0].to_dict(), cases=[c.to_dict() for c in group], warmup=1, repeats=4)
    rows = run_to_end(job, group[0], tmp_path / "alt.log", timeout=60)["rows"]
    assert [(r["method"], r["round"]) for r in rows] == [
        ("stub_ok", 0), ("stub_quad_half", 0), ("stub_quad_half", 1), ("stub_ok", 1),
        ("stub_ok", 2), ("stub_quad_half", 2), ("stub_quad_half", 3), ("stub_ok", 3),
    ]  # fmt: skip
    (r,) = paired_speedups(pd.DataFrame(rows), gq_methods=("stub_quad_half",)).itertuples()
    assert r.rounds == 4 and 1.7 < r.speedup_bwd < 2.3
    bad = dict(job, cases=[stub_case("crash").to_dict()])
    (row,) = run_to_end(bad, group[0], tmp_path / "bad.log", timeout=60)["rows"]
    assert row["status"] == "error" and "crashed on purpose" in row["error"]


def test_failure_in_the_middle_of_the_rounds_leaves_the_group_going(tmp_path):
    """A case that raises, and one that hangs past its timeout, on their second timed call: each
    becomes one failure row; the rest of the group keeps its rounds."""
    cases = [stub_case("ok"), stub_case("crash_later"), stub_case("hang_later")]
    # The timeout covers a fresh worker's start (torch's import): 8 s timed stub_ok out on a loaded 2-core machine.
    df = run_grid(cases, tmp_path, settings=RunSettings(repeats=4, warmup=1, timeout=20), progress=False)
    by = {m: g for m, g in df.groupby("method")}
    assert sorted(by["stub_ok"]["round"]) == [0, 1, 2, 3] and set(by["stub_ok"]["status"]) == {"ok"}
    assert by["stub_crash_later"][["status", "repeat"]].values.tolist() == [["error", 0]]
    assert "in the middle of its rounds" in by["stub_crash_later"]["error"].iloc[0]
    assert by["stub_hang_later"]["status"].tolist() == ["timeout"]


def test_memory_call_counts_blocks_the_timed_calls_freed(tmp_path):
    """Timed calls run under the default allocator, which keeps freed 20 MiB blocks for reuse; the
    memory call still sees the backward's whole 60 MiB (as with MALLOC_MMAP_THRESHOLD_ set from the start)."""
    df = run_grid([stub_case("alloc")], tmp_path, settings=RunSettings(repeats=3, warmup=2, timeout=60),
                  progress=False)  # fmt: skip
    peak = df["peak_mem_bytes"].iloc[0]
    assert 0.95 * stubs.ALLOC_BYTES < peak < 1.25 * stubs.ALLOC_BYTES, peak / 2**20


def test_each_case_is_timed_in_several_fresh_processes(tmp_path, monkeypatch):
    """processes=2: each case runs in two workers, one set after the other, never two calls at once; the
    rotation goes on across processes; rows record their process (and rounds number on); only the first
    process makes a memory call, and every row carries its peak."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(stubs.TRACE_ENV, str(trace))
    cases = [stub_case("ok"), stub_case("quad")]
    settings = RunSettings(repeats=1, processes=2, warmup=1, rewarm=0, timeout=60)
    df = run_grid(cases, tmp_path / "out", settings=settings, progress=False)
    calls = [line.split() for line in trace.read_text().splitlines()]
    # process 0: warm-ups, round 0 (ok, quad), memory calls; process 1: warm-ups, round 1 (quad, ok)
    assert [m for m, *_ in calls] == ["stub_ok", "stub_quad"] * 3 + ["stub_ok", "stub_quad", "stub_quad", "stub_ok"]
    spans = sorted((float(a), float(b)) for *_, a, b in calls)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "two calls overlapped"
    assert len(df) == 4 and (df["status"] == "ok").all()
    for _, g in df.groupby("method"):
        assert g.sort_values("round")[["process", "round", "repeat"]].values.tolist() == [[0, 0, 0], [1, 1, 1]]
        assert g["pid"].nunique() == 2  # two fresh workers
    assert df["pid"].nunique() == 4 and df["peak_mem_bytes"].notna().all()
    from gqbench.results.ratios import paired_speedups

    (r,) = paired_speedups(df, gq_methods=("stub_quad",)).itertuples()
    assert r.processes == 2 and r.rounds == 2 and r.covers == "2 processes x 1 round" and len(r.bwd_per_process) == 2


def test_a_case_failing_in_one_of_its_processes_is_one_failure_row(tmp_path):
    """stub_crash_later fails on its third call in a process (warm-up, round, round): one failure row,
    no later process for it; the other case keeps all its processes' rounds."""
    cases = [stub_case("ok"), stub_case("crash_later")]
    settings = RunSettings(repeats=2, processes=3, warmup=1, rewarm=0, timeout=60)
    df = run_grid(cases, tmp_path, settings=settings, progress=False)
    by = {m: g for m, g in df.groupby("method")}
    assert by["stub_crash_later"]["status"].tolist() == ["error"]
    assert sorted(by["stub_ok"]["round"]) == [0, 1, 2, 3, 4, 5] and sorted(set(by["stub_ok"]["process"])) == [0, 1, 2]
