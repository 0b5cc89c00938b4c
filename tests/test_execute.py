"""Shards, merge and the Ray executor, against a real local Ray cluster (skipped without the ray extra)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import gqbench._testing as stubs  # noqa: F401 -- registers the stub methods in this process
from gqbench import Case, GridSpecError, RunSettings, parse_spec, run_grid
from gqbench.cli import main
from gqbench.execute.merge import merge
from gqbench.execute.shard import Shard, assign

FAST = RunSettings(repeats=3, warmup=1, timeout=60)


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    monkeypatch.setenv("GQBENCH_PLUGINS", "gqbench._testing")


def stub_spec(**axes):
    base = dict(method=["stub_ok", "stub_quad", "stub_nan"], problem=["linear"], width=[3, 5, 7, 9],
                batch=[2], rtol=[1e-3, 1e-5], threads=[1])  # fmt: skip
    return {"name": "stubs", "axes": dict(base, **axes)}


def test_shards_partition_the_grid_and_keep_groups_whole():
    cases = list(parse_spec(stub_spec()).cases)
    for n in (1, 2, 3, 5):
        parts = [assign(cases, Shard(k, n)) for k in range(1, n + 1)]
        ids = [c.case_id for p in parts for c in p]
        assert sorted(ids) == sorted(c.case_id for c in cases)  # every case in exactly one shard
        for p in parts:  # a comparison group never spans shards
            keys = {(c.width, c.rtol) for c in p}
            assert all(len([c for c in p if (c.width, c.rtol) == k]) == 3 for k in keys)
    assert [c.case_id for c in assign(cases, Shard(1, 2))] == [c.case_id for c in assign(cases[::-1], Shard(1, 2))][
        ::-1
    ]
    heavy = [Case("torch_direct", "workload_l", w, 2) for w in (2000, 10, 10, 10, 10)]
    assert [c.width for c in assign(heavy, Shard(1, 2))] == [2000]  # cost-balanced, not count-balanced
    for bad in ("0/2", "3/2", "1", "a/b"):
        with pytest.raises(ValueError, match="K/N"):
            Shard.parse(bad)


def test_two_shards_merged_equal_one_run(tmp_path):
    spec = stub_spec(width=[3, 5])
    cases = list(parse_spec(spec).cases)
    one = run_grid(cases, tmp_path / "one", settings=FAST, spec=spec, progress=False)
    for k in (1, 2):
        run_grid(cases, tmp_path / f"s{k}", settings=FAST, spec=spec, progress=False, shard=f"{k}/2")
    merged = merge(tmp_path / "merged", [tmp_path / "s1", tmp_path / "s2"])
    key = ["case_id", "status", "nfe_fwd", "nfe_bwd"]
    a = one[key].drop_duplicates().sort_values("case_id").reset_index(drop=True)
    b = merged[key].drop_duplicates().sort_values("case_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert merged["machine"].notna().all()
    assert main(["report", str(tmp_path / "merged")]) == 0
    with pytest.raises(GridSpecError, match="the missing shard"):
        merge(tmp_path / "m2", [tmp_path / "s1"])
    with pytest.raises(GridSpecError, match="in both"):
        merge(tmp_path / "m3", [tmp_path / "s1", tmp_path / "s1"])
    run_grid(cases[:3], tmp_path / "other", settings=FAST, spec=stub_spec(width=[3]), progress=False)
    with pytest.raises(GridSpecError, match="another grid"):
        merge(tmp_path / "m4", [tmp_path / "s1", tmp_path / "other"])


# ----------------------------------------------------------------------------- Ray

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real local Ray head on loopback, one per module (starting one costs seconds); yields its address."""
    os.environ["GQBENCH_PLUGINS"] = "gqbench._testing"  # Ray's workers inherit it, and so do ours
    os.environ[stubs.ONCE_ENV] = str(tmp_path_factory.mktemp("once"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))  # fmt: skip
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ray_run_matches_a_local_run(cluster, tmp_path):
    """Same case ids, statuses, NFE, rounds and gradient errors; the failure's log and the reference
    gradient a task computed on its node come back to the driver's folder."""
    spec = stub_spec(method=["stub_ok", "stub_quad", "stub_nan", "stub_crash", "torch_direct"], width=[3], rtol=[1e-5])
    cases = list(parse_spec(spec).cases)
    local = run_grid(cases, tmp_path / "local", settings=FAST, spec=spec, progress=False)
    remote = run_grid(cases, tmp_path / "ray", settings=FAST, spec=spec, progress=False, executor="ray")
    key = ["case_id", "status", "nfe_fwd", "nfe_bwd", "round", "grad_rel_err"]
    pd.testing.assert_frame_equal(
        local[key].sort_values(key).reset_index(drop=True), remote[key].sort_values(key).reset_index(drop=True)
    )
    assert set(remote["status"]) == {"ok", "nan", "error"} and remote["grad_rel_err"].notna().any()
    crashed = {f"{c.case_id}.log" for c in cases if c.method == "stub_crash"}
    logs, refs = ({out: sorted(p.name for p in (tmp_path / out / sub).glob(pat)) for out in ("local", "ray")}
                  for sub, pat in (("logs", "*.log"), ("references", "*.npz")))  # fmt: skip
    assert logs["ray"] == logs["local"] and crashed <= set(logs["ray"]) and "reference.log" in logs["ray"]
    assert refs["ray"] == refs["local"] == ["linear-w3-b2-s0.npz"]
    # resumes like the local runner: nothing runs twice
    again = run_grid(cases, tmp_path / "ray", settings=FAST, spec=spec, progress=False, executor="ray")
    assert len(again) == len(remote)
    # the driver's references travel to the tasks: none is computed again
    torch_only = [c for c in cases if c.method == "torch_direct"]
    df = run_grid(torch_only, tmp_path / "ray2", settings=FAST, progress=False, executor="ray",
                  reference_dir=tmp_path / "ray" / "references")  # fmt: skip
    assert df["grad_rel_err"].notna().all() and not (tmp_path / "ray2" / "logs" / "reference.log").exists()


def test_ray_worker_lost_is_retried_once_then_a_failure_row(cluster, tmp_path):
    """A case that kills the Ray worker running its group: the first time only -> Ray's retry finishes
    it; every time -> failure rows after the one retry. The other groups still finish."""
    spec = stub_spec(method=["stub_ok"], width=[3])
    cases = [*parse_spec(spec).cases, Case("stub_killparent", "linear", 11, 2, threads=1),
             Case("stub_killparent_once", "linear", 13, 2, threads=1)]  # fmt: skip
    df = run_grid(cases, tmp_path / "out", settings=FAST, spec=spec, progress=False, executor="ray")
    status = df.drop_duplicates("case_id").set_index("method")["status"].to_dict()
    assert status == {"stub_ok": "ok", "stub_killparent": "error", "stub_killparent_once": "ok"}
    bad = df[df["method"] == "stub_killparent"]
    assert "Ray task lost twice" in bad["error"].iloc[0]
    assert (Path(os.environ[stubs.ONCE_ENV]) / "killparent-w13").exists()  # it did die once


def test_ray_driver_killed_and_rerun_resumes(cluster, tmp_path):
    """kill -9 of `gqbench run --executor ray` mid-grid, then the same command: every case once."""
    spec = stub_spec(method=["stub_ok"], width=[3, 5, 7, 9], rtol=[1e-3])
    grid = tmp_path / "grid.toml"
    grid.write_text('name = "stubs"\n[run]\nrepeats = 3\nwarmup = 1\ntimeout = 60\n[axes]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in spec["axes"].items()))  # fmt: skip
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gqbench", "run", "--grid", str(grid), "--out", str(out), "--quiet",
           "--executor", "ray", "--address", cluster]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "cases").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json")}
    assert 1 <= len(first) < 4, "the driver should die mid-grid"
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    df = pd.read_parquet(out / "results.parquet")
    assert df["case_id"].nunique() == 4 and len(df) == 4 * FAST.repeats and set(df["status"]) == {"ok"}
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.json") if p.name in first} == first


def test_ray_runs_a_user_problem_from_the_drivers_folder(cluster, tmp_path, monkeypatch):
    """A user's "model.py:make" relative to the driver's working directory: Ray's workers run elsewhere, the
    problem root travels with the task, and the reference computed on the node comes back under the file's hash."""
    import shutil

    shutil.copy(Path(__file__).resolve().parent.parent / "examples" / "spiral.py", tmp_path / "model.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GQBENCH_PROBLEM_ROOT", raising=False)
    cases = [Case(m, "model.py:make", 4, 2, rtol=1e-3, atol=1e-3, threads=1) for m in ("torch_direct", "torch_gq")]
    df = run_grid(cases, tmp_path / "out", settings=FAST, progress=False, executor="ray")
    assert set(df["status"]) == {"ok"}, df["error"].unique()
    assert (df["grad_rel_err"] < 0.05).all()
    refs = [p.name for p in (tmp_path / "out" / "references").glob("*.npz")]
    assert len(refs) == 1 and refs[0].startswith("user-model.py_make-")
