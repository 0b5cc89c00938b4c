"""gqbench: grid spec -> one fresh process per case -> tidy results -> HTML report.

Names load lazily (PEP 562), so `python -m gqbench._worker` pays for torch only, never for
pandas/plotly, and `gqbench report` never for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Case": "_case",
    "CASE_FIELDS": "_case",
    "AbstractProblem": "_problems",
    "ProblemInstance": "_problems",
    "PROBLEMS": "_problems",
    "get_problem": "_problems",
    "AbstractMethod": "_methods",
    "AbstractRun": "_methods",
    "METHODS": "_methods",
    "get_method": "_methods",
    "register_method": "_methods",
    "Skip": "_measure",
    "HARNESS_VERSION": "_measure",
    "prepare": "_measure",
    "measure": "_measure",
    "PeakMemory": "_measure",
    "reference_gradients": "_measure",
    "grad_rel_err": "_measure",
    "GridSpec": "_grid",
    "GridSpecError": "_grid",
    "RunSettings": "_grid",
    "load_spec": "_grid",
    "load_preset": "_grid",
    "parse_spec": "_grid",
    "list_presets": "_grid",
    "run_grid": "_runner",
    "Shard": "execute.shard",
    "merge": "execute.merge",
    "load_results": "_results",
    "COLUMNS": "_results",
    "environment": "_env",
    "write_report": "_report",
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
