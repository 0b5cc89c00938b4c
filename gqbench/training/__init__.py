"""How training runs run: the epoch loop (`loop`), the SDE runs (`sde_ou`), the toy gradient (`toy_gradient`),
their figures and claims. What runs -- the problems' definitions and their registry -- is
`gqbench.define.training_problems` (re-exported here for older imports); this package imports it, never the
reverse.
"""

from __future__ import annotations

import importlib

from ..define.training_problems import (
    TRAINING_PROBLEMS,
    AbstractTrainingProblem,
    Rows,
    TrainingProblem,
    get_training_problem,
    register_training_problem,
)

__all__ = [
    "TRAINING_PROBLEMS",
    "AbstractTrainingProblem",
    "Rows",
    "TrainingProblem",
    "get_training_problem",
    "register_training_problem",
    "run_problem",
]


def run_problem(problem: AbstractTrainingProblem, *, case, cache_dir=None) -> tuple[Rows, dict[str, Rows]]:
    """Train `case` of `problem` in this process: the built-in kinds by their loop here, any other (a user's
    `AbstractTrainingProblem` subclass) by its own `run`."""
    from ..define.experiments import ODEExperiment, ToyGradient

    if isinstance(problem, ODEExperiment):
        from .loop import run_case

        return run_case(problem, case=case, cache_dir=cache_dir)
    if isinstance(problem, ToyGradient):
        from .toy_gradient import run_case

        return run_case(problem, case=case, cache_dir=cache_dir)
    if isinstance(problem, TrainingProblem):
        return importlib.import_module(problem.module).run_case(case, problem, cache_dir)
    return problem.run(case=case, cache_dir=cache_dir)
