"""`gqbench merge OUT DIR...`: shard folders of one grid -> one results folder.

Refuses (one line naming the fix) folders of other grids, a case finished in two shards, and a
grid with cases no shard finished. Each row keeps the machine it ran on; OUT/environment.json lists
every shard's environment.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..define.grid import GridSpecError
from ..results.tables import finished_ids, rebuild_results, rebuild_tables, write_atomic, write_case


def _environment(d: Path) -> dict:
    path = d / "environment.json"
    if not path.exists():
        raise GridSpecError(f"gqbench merge: {d} has no environment.json; give folders written by `gqbench run`")
    return json.loads(path.read_text())


def machine_of(env: dict) -> str:
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus") or [])
    return f"{env.get('hostname')} ({env.get('cpu_model')}{'; ' + gpus if gpus else ''})"


def grid_identity(case_ids) -> dict:
    """A grid's fingerprint, recorded by `gqbench run` before sharding: its number of cases and a hash
    of their ids (order-free)."""
    import hashlib

    ids = sorted(case_ids)
    return dict(cases=len(ids), id=hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16])


def merge(out: str | Path, dirs: list[str | Path]):
    out, dirs = Path(out), [Path(d) for d in dirs]
    if not dirs:
        raise GridSpecError("gqbench merge OUT DIR...: give at least one shard folder")
    envs = [_environment(d) for d in dirs]
    for d, e in zip(dirs[1:], envs[1:]):
        if (e.get("grid"), e.get("spec")) != (envs[0].get("grid"), envs[0].get("spec")):
            raise GridSpecError(f"gqbench merge: {d} ran another grid than {dirs[0]}; merge shards of one grid only")
    owner: dict[str, Path] = {}
    for d in dirs:
        for cid in finished_ids(d):
            if cid in owner:
                raise GridSpecError(f"gqbench merge: case {cid} is in both {owner[cid]} and {d}; drop one of them")
            owner[cid] = d
    grid = envs[0].get("grid")
    if grid is not None and grid_identity(owner) != grid:
        have, need = len(owner), grid["cases"]
        raise GridSpecError(f"gqbench merge: these folders hold {have} finished cases, the grid has {need} "
                            "(a shard missing or unfinished); run the missing shard(s) first")  # fmt: skip
    if out.exists() and any(out.iterdir()):
        raise GridSpecError(f"gqbench merge: {out} is not empty; merge into a new folder")
    for d, env in zip(dirs, envs):
        machine = machine_of(env)
        for cid in finished_ids(d):
            rows = json.loads((d / "cases" / f"{cid}.json").read_text())
            write_case(out, cid, [dict(r, machine=r.get("machine") or machine) for r in rows])
        if (d / "tables").is_dir():
            shutil.copytree(d / "tables", out / "tables", dirs_exist_ok=True)
    shards = [dict(folder=str(d), machine=machine_of(e), git_sha=e.get("git_sha"), date=e.get("date"),
                   settings=e.get("settings")) for d, e in zip(dirs, envs)]  # fmt: skip
    env = dict(envs[0], shards=shards)
    write_atomic(out / "environment.json", json.dumps(env, indent=2, default=str).encode())
    rebuild_tables(out)
    return rebuild_results(out)
