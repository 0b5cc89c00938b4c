"""`gqbench run --executor ray [--address ADDR] [--per-node N]`: comparison groups as Ray tasks.

Each task runs `gqbench._runner.run_group` on its node: the same fresh worker processes, paired
rounds, timeouts and failure rows as a local run; only where it runs changes. Ray reserves
`num_cpus` = the cases' threads and one GPU for a CUDA group, so two timed cases never share a GPU.
At most `per_node` groups run on a node at a time (by default one: concurrent cases contend for
memory bandwidth and skew each other's times): the driver keeps `per_node` lanes per alive node and
pins each task to its lane's node. Results stream back to the driver, which writes them as the local
runner does. A task whose Ray worker or node is lost is retried once by Ray, then its cases become
failure rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .._case import Case
from .._grid import RunSettings
from .._measure import failure_rows


def _run_group_task(cases: list[dict], settings: dict, out_dir: str, ref_dir: str) -> list[tuple]:
    from rich.console import Console

    from .._runner import machine_name, run_group

    group = [Case.from_dict(c) for c in cases]
    done = run_group(group, Path(out_dir), RunSettings(**settings), Path(ref_dir), {}, Console(quiet=True))
    here = machine_name()
    return [(case.to_dict(), [dict(r, machine=here) for r in rows], tables, s) for case, rows, tables, s in done]


def run_groups(
    groups: list[list[Case]],
    *,
    out_dir: Path,
    settings: RunSettings,
    ref_dir: Path,
    address: str | None = None,
    per_node: int = 1,
) -> Iterator[tuple[Case, list[dict], dict, float]]:
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    except ImportError:
        raise RuntimeError("--executor ray needs the ray extra: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    lanes = [node for node in nodes for _ in range(per_node)]
    task = ray.remote(max_retries=1)(_run_group_task)
    queue = list(groups)
    running: dict = {}

    def submit(node: str) -> None:
        group = queue.pop(0)
        opts = dict(
            num_cpus=max(c.threads for c in group),
            num_gpus=1 if any(c.device.startswith("cuda") for c in group) else 0,
            # soft: Ray's retry of a task whose node was lost may run elsewhere
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=True),
        )
        ref = task.options(**opts).remote([c.to_dict() for c in group], vars(settings), str(out_dir), str(ref_dir))
        running[ref] = (node, group)

    for node in lanes:
        if queue:
            submit(node)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        node, group = running.pop(ref)
        try:
            for case, rows, tables, worker_s in ray.get(ref):
                yield Case.from_dict(case), rows, tables, worker_s
        except Exception as exc:  # noqa: BLE001 -- the task failed twice (Ray retried it once): failure rows
            why = " ".join(str(exc).split())[:300]
            for case in group:
                yield case, failure_rows(case, "error", f"Ray task lost twice ({type(exc).__name__}): {why}"), {}, 0.0
        if queue:
            submit(node)
