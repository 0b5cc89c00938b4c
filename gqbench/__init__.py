"""gqbench: grid spec -> one fresh process per case -> tidy results -> HTML report.

Names load lazily (PEP 562), so `python -m gqbench.measurement.worker` pays for torch only, never for
pandas/plotly, and `gqbench report` never for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Case": "define.case",
    "CASE_FIELDS": "define.case",
    "AbstractProblem": "define.problems",
    "ProblemInstance": "define.problems",
    "PROBLEMS": "define.problems",
    "get_problem": "define.problems",
    "AbstractMethod": "define.methods",
    "AbstractRun": "define.methods",
    "METHODS": "define.methods",
    "get_method": "define.methods",
    "register_method": "define.methods",
    "Skip": "measurement.measure",
    "HARNESS_VERSION": "measurement.measure",
    "prepare": "measurement.measure",
    "measure": "measurement.measure",
    "PeakMemory": "measurement.measure",
    "reference_gradients": "measurement.measure",
    "grad_rel_err": "measurement.measure",
    "GridSpec": "define.grid",
    "GridSpecError": "define.grid",
    "RunSettings": "define.grid",
    "load_spec": "define.grid",
    "load_preset": "define.grid",
    "parse_spec": "define.grid",
    "list_presets": "define.grid",
    "run_grid": "execute.runner",
    "Shard": "execute.shard",
    "merge": "execute.merge",
    "load_results": "results.tables",
    "COLUMNS": "results.tables",
    "environment": "measurement.env",
    "write_report": "report.html",
    "advise": "advise",
    "advice_table": "results.advice",
    "UserProblemError": "define.user_problems",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gqbench' has no attribute {name!r}")


def __dir__():
    return __all__
