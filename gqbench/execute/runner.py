"""Run a grid: each case in a fresh worker process with a timeout, results appended atomically.

Cases that differ only in the method and its settings form a comparison group. The group's workers
are alive together and their timed calls alternate round by round (the order rotating each round,
never two at once), so a machine's drift hits every method alike and ratios can be taken per round.
Re-running the same command after a crash or `kill -9` skips the finished comparison groups (every
case's file in DIR/cases/) and runs the rest; nothing is lost or duplicated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..define.case import Case
from ..define.grid import GridSpecError, RunSettings
from ..measurement.launch import (  # noqa: F401 (re-exported)
    PACKAGE_ROOT,
    Worker,
    WorkerFailed,
    check_user_problems,
    run_to_end,
    worker_env,
)
from ..results.tables import rebuild_results, rebuild_tables, write_atomic, write_case, write_table
from .group import comparison_groups, group_key, machine_name, run_group  # noqa: F401 (re-exported)


def run_grid(
    cases: Sequence[Case],
    out_dir: str | Path,
    *,
    settings: RunSettings | None = None,
    spec: dict | None = None,
    progress: bool = True,
    reference_dir: str | Path | None = None,
    executor: str = "local",
    address: str | None = None,
    per_node: int = 1,
    shard: str | None = None,
):
    """Run every case not yet finished in `out_dir`; returns the whole results table.

    `executor="ray"`: comparison groups run as Ray tasks (`gqbench.execute.ray_executor`) on the
    cluster at `address` (None: a local one), at most `per_node` at a time per node. `shard` ("K/N"):
    only this shard's cases (`gqbench.execute.shard`)."""
    settings = RunSettings() if settings is None else settings
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..measurement.env import environment
    from ..results.tables import finished_ids

    out_dir = Path(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    ref_dir = Path(reference_dir) if reference_dir is not None else out_dir / "references"
    if executor not in ("local", "ray"):
        raise ValueError(f"executor={executor!r}: use 'local' or 'ray'")
    if per_node < 1:
        raise ValueError(f"--per-node {per_node}: must be >= 1")
    cases = list(dict.fromkeys(cases))
    from .merge import grid_identity

    grid = grid_identity(c.case_id for c in cases)  # the whole grid, before sharding: merge checks it
    if shard is not None:
        from .shard import Shard, assign

        cases = assign(cases, Shard.parse(shard))
    done = finished_ids(out_dir)
    # A comparison group is finished only when every case of it has its file: a group cut short (a kill
    # while its cases' files were being written) runs again whole, so its rounds stay paired.
    todo = [c for g in comparison_groups(cases) if any(c.case_id not in done for c in g) for c in g]
    user = _user_problems(cases, out_dir, resuming=len(todo) < len(cases))
    check_user_problems(todo, out_dir / "logs" / "check.log", settings.timeout)  # before any case starts
    env = environment(threads=sorted({c.threads for c in cases}))
    env.update(executor=executor, per_node=per_node, shard=shard, grid=grid)
    if user:
        env["user_problems"] = user
    _write_environment(out_dir, env, spec, settings, n_cases=len(cases), n_done=len(cases) - len(todo))
    machine = machine_name()
    console = Console(stderr=True, quiet=not progress)
    if len(todo) < len(cases):
        console.print(f"{out_dir}: {len(cases) - len(todo)} of {len(cases)} cases already done; running the rest")
    failed_refs: dict[tuple, str] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("gqbench", total=len(todo))
        groups = comparison_groups(todo)
        if executor == "ray":
            from .ray_executor import run_groups

            bar.update(task, description=f"{len(groups)} groups on Ray")
            finished = run_groups(groups, out_dir=out_dir, settings=settings, ref_dir=ref_dir, address=address,
                                  per_node=per_node)  # fmt: skip
        else:
            finished = _run_locally(groups, out_dir, settings, ref_dir, failed_refs, console, bar, task)
        for case, rows, tables, worker_s in finished:
            for row in rows:
                row["label"] = case.label
                row["worker_s"] = worker_s
                row.setdefault("machine", machine)
            for name, table in tables.items():  # before the case file, which marks the case finished
                write_table(out_dir, name, case.case_id, [dict(r, label=case.label) for r in table])
            write_case(out_dir, case.case_id, rows)
            if tables:
                rebuild_tables(out_dir)
            bar.advance(task)
            rebuild_results(out_dir)
    return rebuild_results(out_dir)


def _user_problems(cases, out_dir: Path, resuming: bool) -> dict:
    """{name: {file, sha}} of the user problems among `cases`. A resumed run stops (one line) when a model's
    file changed since its first cases ran: their rows would mix two models under one name."""
    from ..define.user_problems import fingerprint, is_user_problem, source_file

    names = dict.fromkeys(c.problem for c in cases if is_user_problem(c.problem))
    user = {name: dict(file=str(source_file(name)), sha=fingerprint(name)) for name in names}
    path = out_dir / "environment.json"
    if user and resuming and path.exists():
        try:
            before = json.loads(path.read_text()).get("user_problems") or {}
        except (OSError, ValueError):
            before = {}
        for name, now in user.items():
            if name in before and before[name].get("sha") != now["sha"]:
                raise GridSpecError(f"{now['file']} changed since {out_dir} ran cases of {name!r}; give a new --out "
                                    f"(or delete {out_dir / 'cases'}) to measure the edited model")  # fmt: skip
    return user


def _run_locally(groups, out_dir, settings, ref_dir, failed_refs, console, bar, task):
    from rich.markup import escape

    for group in groups:
        c = group[0]
        methods = escape(", ".join(x.label for x in group))  # torch_gq[adaptive] is not rich markup
        bar.update(task, description=f"{c.problem} w={c.width} tol={c.rtol:g}: {methods}")
        yield from run_group(group, out_dir, settings, ref_dir, failed_refs, console)


def _write_environment(
    out_dir: Path, env: dict, spec: dict | None, settings: RunSettings, n_cases: int, n_done: int
) -> None:
    path = out_dir / "environment.json"
    runs = []
    if path.exists():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError):
            runs = []
    runs.append(dict(date=env["date"], git_sha=env["git_sha"], cases=n_cases, already_done=n_done))
    data = dict(env, settings=vars(settings), spec=spec, runs=runs)
    write_atomic(path, json.dumps(data, indent=2, default=str).encode())
