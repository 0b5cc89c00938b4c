"""Stress suite (issue 23): GQ's default off the beaten path, against issue 23's bounds.

    python benchmarks/stress.py [--fast] [--families square_wave,kinetics] [--out DIR] [--cache DIR]

Families of fields (gqbench.define.stress_problems): smooth MLPs, oscillators, piecewise forcing, fields
with a kink or a jump in t, stiff kinetics, contractive fields, a conv ODE, many observation times and
workload L, at float32 and float64, tolerances 1e-3 ... 1e-10 as the dtype allows, initial and trained
weights. Per case and method (GQ's default, torchdiffeq's adjoint, direct backprop): gradient error
against a float64 reference, backward cost (NFE + GQ's nodes), wall time, warnings, GQ's stats. A case
passes when GQ's error <= 10 x max(rtol, best of adjoint/direct) or GQ warned naming its estimate, and
GQ's backward NFE + nodes <= 3 x the adjoint's backward NFE where the adjoint succeeded.

Each method runs in a worker process with a time limit (--timeout): a case that hangs becomes a
`timeout` row and the worker is replaced. Rows go to DIR/stress.parquet and DIR/stress.csv (written
atomically after every case); a rerun skips the cases already there. The verdict table is printed and
written to DIR/stress.md.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/stress.py` from a checkout

from gqbench.define.stress_problems import FAMILIES, StressCase, stress_cases  # noqa: E402
from gqbench.measurement.stress import METHODS, case_row, verdict  # noqa: E402

PREPARE_TIMEOUT = 900.0  # training and the float64 reference, once per problem_key (cached)


def _serve(conn, cache: str, threads: int) -> None:
    """Worker loop: ("prepare", case) -> reference (and trained weights); ("measure", case, method[, GQ's
    backward_state]) -> row."""
    import warnings

    import torch

    from gqbench.measurement.stress import measure, reference

    torch.set_num_threads(threads)
    warnings.simplefilter("default")
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent is gone
            return
        if job is None:
            return
        try:
            if job[0] == "prepare":
                reference(job[1], cache)
                conn.send({"status": "ok"})
            else:
                conn.send(measure(job[1], job[2], cache, *job[3:]))  # ("measure", case, method[, backward_state])
        except Exception as exc:  # noqa: BLE001 -- reported as a row
            conn.send({"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})


class Worker:
    """A worker process reused across jobs, replaced when a job overruns its time limit or it dies."""

    def __init__(self, cache: str, threads: int):
        self.cache, self.threads, self.proc = cache, threads, None

    def run(self, job: tuple, timeout: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            ctx = multiprocessing.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_serve, args=(child, self.cache, self.threads), daemon=True)
            self.proc.start()
        self.conn.send(job)
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            self.close()
            return {"status": "crashed", "error": f"worker died (exit code {self.proc.exitcode})"}
        self.close()
        return {"status": "timeout", "error": f"over the {timeout:.0f} s limit"}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
            self.proc = None


def write_atomic(df: pd.DataFrame, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, write in (("stress.parquet", df.to_parquet), ("stress.csv", df.to_csv)):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        write(tmp, index=False)
        os.replace(tmp, out / name)


def run_suite(
    cases: list[StressCase], out: Path, cache: Path, *, timeout: float, threads: int = 1, backward_state: str = "auto"
) -> pd.DataFrame:
    """Run every case not yet in out/stress.parquet; returns the whole table. `backward_state`: GQ's, for
    every case ("auto": its default; rows of the stops before "auto" existed say "": the backsolve default then);
    a folder holds rows of one setting only."""
    path = out / "stress.parquet"
    df = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    held = set(df["gq_backward_state"].fillna("")) if "gq_backward_state" in df else ({""} if len(df) else set())
    if held - {backward_state}:
        theirs = ", ".join(repr(x or "backsolve (the default then)") for x in sorted(held))
        raise SystemExit(f"{out} holds rows measured with GQ's backward_state {theirs}, not "
                         f"{backward_state!r}; pass another --out")  # fmt: skip
    done = set(df["case_id"]) if len(df) else set()
    todo = [c for c in cases if c.case_id not in done]
    worker = Worker(str(cache), threads)
    try:
        for i, case in enumerate(todo):
            start = time.perf_counter()
            prep = worker.run(("prepare", case), PREPARE_TIMEOUT)
            rows = []
            for method in METHODS:
                if prep["status"] != "ok":
                    row = {"status": "no_reference", "error": prep["error"]}
                else:
                    row = worker.run(("measure", case, method, backward_state), timeout)
                rows.append({**case_row(case), "method": method, "gq_backward_state": backward_state, **row})
            v = verdict(rows)
            rows = [{**r, **v} for r in rows]
            df = pd.concat([df, pd.DataFrame(rows)], ignore_index=True)
            write_atomic(df, out)
            print(f"[{i + 1}/{len(todo)}] {case.case_id}: {'pass' if v['passed'] else 'FAIL'} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    finally:
        worker.close()
    return df


def verdict_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per case: family x dtype x tol x weights, GQ's error vs its bound, cost vs its bound."""
    lines = []
    for case_id, g in df.groupby("case_id", sort=False):
        by = {r["method"]: r for r in g.to_dict("records")}
        gq, adj, direct = by.get("gq", {}), by.get("adjoint", {}), by.get("direct", {})
        lines.append(dict(
            problem=gq["problem_key"][: gq["problem_key"].rindex("]") + 1], dtype=gq["dtype"], rtol=gq["rtol"],
            atol=gq["atol"], solver=_solver_label(gq),
            weights=gq["weights"], gq_err=gq.get("grad_rel_err"), adj_err=adj.get("grad_rel_err"),
            direct_err=direct.get("grad_rel_err"), err_bound=gq["error_bound"], gq_cost=gq.get("cost"),
            adj_nfe_bwd=adj.get("nfe_bwd"), cost_bound=gq["cost_bound"], warned=gq["warned"],
            error_ok=gq["error_ok"], cost_ok=gq["cost_ok"],
            status="/".join(str(by.get(m, {}).get("status")) for m in METHODS), case_id=case_id,
        ))  # fmt: skip
    table = pd.DataFrame(lines)
    if len(table):  # how far over its bound GQ is (NaN cost: GQ failed or timed out)
        table["err_x"] = table["gq_err"].astype(float) / table["err_bound"]
        table["cost_x"] = table["gq_cost"].astype(float) / table["cost_bound"]
    return table


def _solver_label(row: dict) -> str:
    solver, steps = row.get("solver") or "dopri5", row.get("grid_steps") or 0
    return f"{solver} ({int(steps)} steps)" if steps and steps == steps else solver


def _fmt(x, spec=".1e") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _verdict(bad: list[str], status: str) -> str:
    if not bad:
        return "pass"
    if status.endswith("timeout/timeout"):  # GQ and the adjoint both ran out of time: no comparison
        return "inconclusive (timeouts)"
    return "FAIL " + "+".join(bad)


def markdown(table: pd.DataFrame, only_failures: bool = False) -> str:
    head = ("| problem | dtype | solver | rtol | weights | GQ err | bound | x | adj err | direct err | GQ cost | bound "
            "| x | warned | verdict | status (direct/adjoint/gq) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table.to_dict("records"):
        bad = [k for k, ok in (("err", r["error_ok"]), ("cost", r["cost_ok"])) if not ok]
        if only_failures and not bad:
            continue
        lines.append(
            f"| {r['problem']} | {r['dtype']} | {r.get('solver', 'dopri5')} | {r['rtol']:.0e} | {r['weights']} "
            f"| {_fmt(r['gq_err'])} "
            f"| {_fmt(r['err_bound'])} | {_fmt(r['err_x'], '.2g')} | {_fmt(r['adj_err'])} | {_fmt(r['direct_err'])} "
            f"| {_fmt(r['gq_cost'], '.0f')} | {_fmt(r['cost_bound'], '.0f')} | {_fmt(r['cost_x'], '.2g')} "
            f"| {'yes' if r['warned'] else ''} | {_verdict(bad, r['status'])} | {r['status']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="the small subset (< ~3 min on 2 idle cores)")
    p.add_argument("--families", default=None, help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    p.add_argument("--match", default=None, help="only cases whose id contains this (e.g. -rk4- or -euler-)")
    p.add_argument("--out", default="reports/stress", help="output folder (stress.parquet, .csv, .md)")
    p.add_argument("--cache", default=None, help="trained weights and references (default OUT/cache)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per case and method")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    p.add_argument(
        "--backward-state",
        choices=["auto", "backsolve", "interpolate"],
        default="auto",
        help="GQ's backward_state for every case (default: auto, GQ's own default); rows record it",
    )
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--failures", action="store_true", help="print only the cases outside the bounds")
    args = p.parse_args(argv)
    families = args.families.split(",") if args.families else None
    cases = stress_cases(fast=args.fast, families=families)
    if args.match:
        cases = [c for c in cases if args.match in c.case_id]
    if args.list:
        print("\n".join(c.case_id for c in cases), f"\n{len(cases)} cases", sep="")
        return
    # SIGTERM ends the run like Ctrl-C: the worker is killed with it, the rows so far are kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    df = run_suite(cases, out, cache, timeout=args.timeout, threads=args.threads, backward_state=args.backward_state)
    ids = {c.case_id for c in cases}
    table = verdict_table(df[df["case_id"].isin(ids)])
    (out / "stress.md").write_text(markdown(table) + "\n")
    print(markdown(table, only_failures=args.failures))
    print(f"\n{int((table.error_ok & table.cost_ok).sum())}/{len(table)} cases within the bounds")


if __name__ == "__main__":
    main()
