"""`gqbench run --executor ray [--address ADDR] [--per-node N]`: comparison groups as Ray tasks.

Each task runs `gqbench.execute.group.run_group` on its node: the same fresh worker processes, paired
rounds, timeouts and failure rows as a local run; only where it runs changes. Ray reserves
`num_cpus` = the cases' threads and one GPU for a CUDA group, so two timed cases never share a GPU.
At most `per_node` groups run on a node at a time (by default one: concurrent cases contend for
memory bandwidth and skew each other's times): the driver counts the groups running on each alive
node and places each task on a node with room through Ray's node-affinity strategy. Results stream
back to the driver, which writes them as the local runner does. A task whose Ray worker or node is
lost is retried once by Ray, then its cases become failure rows; a group no node of the cluster has
the CPUs or GPU for becomes skipped rows at once (Ray would wait for such a node forever).

Nodes need not share a file system: a task works in a temporary folder on its node, gets the
reference gradients the driver has through Ray's object store (each moves to a node at most once),
and sends back its results, the logs of its failed cases and the references it computed, which the
driver writes into the run folder. User problems ("path/to/file.py:make") resolve against the driver's
problem root on every node (`gqbench.define.user_problems`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..define.case import Case
from ..define.grid import RunSettings
from ..measurement.measure import failure_rows, reference_path

REFRESH_S = 30.0  # how often the driver looks for nodes that joined while every task is still running


def _run_group_task(cases: list[dict], settings: dict, references: dict, environ: dict) -> dict:
    import shutil
    import tempfile

    import ray
    from rich.console import Console

    from ..results.tables import write_atomic
    from .group import machine_name, run_group

    work = Path(tempfile.mkdtemp(prefix="gqbench-ray-"))
    os.environ.update(environ)  # the driver's problem root: the workers started here inherit it
    try:
        ref_dir = work / "references"
        for name, obj in references.items():
            write_atomic(ref_dir / name, ray.get(obj))
        shipped = set(references)
        group = [Case.from_dict(c) for c in cases]
        done = list(run_group(group, work, RunSettings(**settings), ref_dir, {}, Console(quiet=True)))
        here = machine_name()
        return dict(
            results=[(c.to_dict(), [dict(r, machine=here) for r in rows], tables, s) for c, rows, tables, s in done],
            logs={p.name: p.read_bytes() for p in sorted((work / "logs").glob("*.log"))},
            references={
                p.name: p.read_bytes()
                for p in sorted(ref_dir.glob("*.npz"))
                if p.name not in shipped and ".tmp." not in p.name
            },
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _needs(group: list[Case]) -> tuple[int, int]:
    """(CPUs, GPUs) a group's task reserves."""
    return max(c.threads for c in group), int(any(c.device.startswith("cuda") for c in group))


def _fits(group: list[Case], resources: dict) -> bool:
    cpus, gpus = _needs(group)
    return resources.get("CPU", 0) >= cpus and resources.get("GPU", 0) >= gpus


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
    from ..define.user_problems import ROOT_ENV, problem_root
    from ..results.tables import write_atomic

    environ = {ROOT_ENV: str(problem_root())}
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(max_retries=1)(_run_group_task)  # Ray reruns a task whose worker or node was lost, once
    queue = list(groups)
    running: dict = {}  # ObjectRef -> (node id, group)
    busy: Counter = Counter()  # groups running per node
    shipped: dict = {}  # reference file name -> ObjectRef of its bytes, put once

    def references(group: list[Case]) -> dict:
        refs = {}
        for case in group:
            path = reference_path(case, ref_dir)
            if path.exists():
                if path.name not in shipped:
                    shipped[path.name] = ray.put(path.read_bytes())
                refs[path.name] = shipped[path.name]
        return refs

    def submit(group: list[Case], node: str) -> None:
        cpus, gpus = _needs(group)
        opts = dict(
            num_cpus=cpus,
            num_gpus=gpus,
            # soft: Ray's retry of a task whose node was lost may run on another node
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=True),
        )
        ref = task.options(**opts).remote([c.to_dict() for c in group], vars(settings), references(group), environ)
        running[ref] = (node, group)
        busy[node] += 1

    while queue or running:
        nodes = {n["NodeID"]: n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")}
        for group in [g for g in queue if not any(_fits(g, r) for r in nodes.values())]:
            queue.remove(group)
            cpus, gpus = _needs(group)
            why = (f"no alive node of the Ray cluster has {cpus} CPU(s){' and a GPU' if gpus else ''}; add one "
                   f"(ray start --address ...) or lower threads")  # fmt: skip
            for case in group:
                yield case, failure_rows(case, "skipped", why), {}, 0.0
        for group in list(queue):
            node = next((n for n in sorted(nodes) if busy[n] < per_node and _fits(group, nodes[n])), None)
            if node is not None:
                queue.remove(group)
                submit(group, node)
        if not running:
            continue
        ready, _ = ray.wait(list(running), num_returns=1, timeout=REFRESH_S)
        if not ready:
            continue
        node, group = running.pop(ready[0])
        busy[node] -= 1
        try:
            out = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 -- lost twice (Ray retried once) or the task raised: failure rows
            lost = not isinstance(exc, ray.exceptions.RayTaskError)  # not an exception raised by the task itself
            why = " ".join(str(exc).split())[:300]
            msg = f"Ray task lost twice ({type(exc).__name__}): {why}" if lost else f"{type(exc).__name__}: {why}"
            for case in group:
                yield case, failure_rows(case, "error", msg), {}, 0.0
            continue
        for name, data in out["references"].items():
            write_atomic(ref_dir / name, data)
        for name, data in out["logs"].items():
            write_atomic(out_dir / "logs" / name, data)
        for case, rows, tables, worker_s in out["results"]:
            yield Case.from_dict(case), rows, tables, worker_s
