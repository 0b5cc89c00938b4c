"""The results table: one row per case x repeat, rebuilt atomically from per-case files.

`DIR/cases/<case_id>.json` (written once, atomically, when a case finishes) is the source of truth;
`DIR/results.parquet` is rebuilt from them, so a killed run loses at most the case in flight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..define.case import CASE_FIELDS

_INTS = (
    "width", "batch", "quad_order", "seed", "threads", "repeat", "round", "process", "warmup", "epochs", "ncosines",
    "quad_unconverged", "backsolve_fallbacks", "train_steps",
)  # fmt: skip
_STRINGS = (
    "machine",
    "case_id", "label", "method", "problem", "quadrature", "backward_state", "solver", "device", "dtype", "status",
    "error", "weights",
)  # fmt: skip
MEASURES = (
    "repeat",
    "round",  # the round of paired timing the sample was taken in (compared methods alternate per round)
    "process",  # which of the case's fresh worker processes took the sample (0, 1, ...; intervals are over them)
    "fwd_s",
    "bwd_s",
    "fwd_page_faults",  # minor page faults of the process during the timed forward / backward
    "bwd_page_faults",
    "peak_mem_bytes",
    "nfe_fwd",
    "nfe_bwd",
    "nfe_fwd_max",  # per-sample solvers (torchode): nfe_fwd counts batched calls (= the slowest sample's) ...
    "nfe_fwd_mean",  # ... and these what each sample's own steps took, mean over the batch
    "nfe_bwd_mean",
    "quad_nodes",
    "quad_err_est",  # GQ's own relative error estimate of dL/dtheta (adaptive rule), beside the measured one
    "quad_unconverged",  # GQ: panels still failing at its node cap / bisection limit
    "backsolve_fallbacks",  # GQ: backward passes redone with the kept forward (backsolving z failed)
    "certified",  # GQ: False when the call warned its gradient is not certified; empty for other methods
    "grad_rel_err",
    "loss",
    "compile_s",
    "setup_s",
    "warmup",
    "status",
    "error",
    "worker_s",
    "machine",  # where the case ran (hostname and CPU): merged shards may come from several machines
)
COLUMNS = ("case_id", "label", *CASE_FIELDS, *MEASURES)
# Every column not an integer, a string or a flag is a float.
_DTYPES = {
    **{c: "float64" for c in COLUMNS if c not in (*_INTS, *_STRINGS, "warm_start", "certified")},
    **{c: "Int64" for c in _INTS},
    "warm_start": "boolean",
    "certified": "boolean",
}


def all_certified(flags: pd.Series):
    """A case's (or label's) `certified` over its repeats: False if any said False, NA if none said."""
    flags = flags.astype("boolean")
    return pd.NA if flags.isna().all() else bool(flags.dropna().all())


def case_path(out_dir: Path, case_id: str) -> Path:
    return Path(out_dir) / "cases" / f"{case_id}.json"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_case(out_dir: Path, case_id: str, rows: list[dict]) -> None:
    write_atomic(case_path(out_dir, case_id), json.dumps(rows, default=_json_default).encode())


def write_table(out_dir: Path, name: str, case_id: str, rows: list[dict]) -> None:
    """A further table's rows of one case (e.g. a training run's epochs): DIR/tables/<name>/<case_id>.json."""
    write_atomic(Path(out_dir) / "tables" / name / f"{case_id}.json", json.dumps(rows, default=_json_default).encode())


def rebuild_tables(out_dir: Path) -> dict[str, pd.DataFrame]:
    """DIR/<name>.parquet from the per-case files of finished cases (a killed case's partial table is left out)."""
    out_dir = Path(out_dir)
    done = finished_ids(out_dir)
    out = {}
    for folder in sorted(p for p in (out_dir / "tables").glob("*") if p.is_dir()):
        rows = []
        for p in sorted(folder.glob("*.json")):
            if p.stem in done:
                rows += json.loads(p.read_text())
        df = frame(rows)
        df = df.drop(columns=[c for c in MEASURES if c not in rows[0]] if rows else [])
        tmp = out_dir / f".{folder.name}.parquet.{os.getpid()}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, out_dir / f"{folder.name}.parquet")
        out[folder.name] = df
    return out


def load_table(out_dir: str | Path, name: str) -> pd.DataFrame | None:
    """DIR/<name>.parquet (e.g. `epochs`), or None when the run has no such table."""
    path = Path(out_dir) / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def _json_default(x):
    try:
        return x.item()  # numpy scalars
    except AttributeError:
        return str(x)


def finished_ids(out_dir: Path) -> set[str]:
    return {p.stem for p in (Path(out_dir) / "cases").glob("*.json")}


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> the table with the documented columns first, in a fixed dtype per column."""
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extra]
    for col, dtype in _DTYPES.items():
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(dtype)
    for col in _STRINGS:
        df[col] = df[col].astype("string")
    return _late_defaults(df)


def _late_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """Rows from before a case field existed mean its default (groupings would drop them as missing)."""
    for col, default, dtype in (("train_steps", 0, "Int64"), ("weights", "", "string")):
        df[col] = (
            df[col].fillna(default).astype(dtype) if col in df else pd.Series(default, index=df.index, dtype=dtype)
        )
    return df


def rebuild_results(out_dir: Path) -> pd.DataFrame:
    out_dir = Path(out_dir)
    rows = []
    for p in sorted((out_dir / "cases").glob("*.json")):
        rows += json.loads(p.read_text())
    df = frame(rows)
    tmp = out_dir / f".results.parquet.{os.getpid()}.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / "results.parquet")
    return df


def load_results(out_dir: str | Path) -> pd.DataFrame:
    """`DIR/results.parquet` as a DataFrame (rebuilt from DIR/cases if the table is missing)."""
    out_dir = Path(out_dir)
    path = out_dir / "results.parquet"
    if not path.exists():
        if not (out_dir / "cases").is_dir():
            raise FileNotFoundError(f"{path} does not exist; run `gqbench run --out {out_dir}` first")
        return rebuild_results(out_dir)
    return _late_defaults(pd.read_parquet(path))
