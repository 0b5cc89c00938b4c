"""What a training run is (gqbench.training holds how it runs): the base class, the registry, the paper's
experiments' definitions.

A case with `epochs` set trains a model in the worker instead of timing one gradient. Same runner, same
failure rows; a training case gives one row in `results.parquet` (medians over its epochs) and its per-epoch
rows in `epochs.parquet` (plus any further tables, e.g. `sde_bands.parquet`, `toy_gradient.parquet`), with the
case fields on every row. Import-light: torch loads only when a case runs.

To add a training problem: subclass `AbstractTrainingProblem` (and define `run`) or, for a neural ODE trained
on a data set, `gqbench.define.experiments.ODEExperiment`, which needs only data, model, loss and metric (the
loop in `gqbench.training.loop` runs it); add it to `TRAINING_PROBLEMS` with `register_training_problem`, or
name an instance of it in your own module in a grid spec ("pkg.module:problem", "path/to/file.py:problem";
`get_training_problem`). Imports go one way: `gqbench.training` imports this module, never the reverse.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .case import Case

Rows = list[dict[str, Any]]


class AbstractTrainingProblem(abc.ABC):
    """A training experiment the runner can run as a case.

    Attributes every problem has (the grid reads them): `name`, `description`, `methods` (the method names
    it trains), `default_width`, `default_batch`, `default_epochs`, `default_lr` (None: the problem sets its
    own learning rate and the grid has no `lr` axis for it), `noise_axis` (the `ncosines` axis applies).
    """

    name: str
    description: str
    methods: tuple[str, ...]
    default_width: int
    default_batch: int
    default_epochs: int
    default_lr: float | None = None
    noise_axis: bool = False

    def unsupported(self, method: str) -> str | None:
        """Why this problem cannot train `method` (the grid stops with it), or None."""
        if method not in self.methods:
            return f"{self.name} trains {', '.join(self.methods)}, not {method}"
        return None

    def run(self, *, case: Case, cache_dir=None) -> tuple[Rows, dict[str, Rows]]:
        """Train in this process (the worker's): -> (results rows, {table name: rows}).

        One results row per case (status "ok", or "nan" for a run that diverged) and per-epoch rows under
        "epochs"; every row carries `case.to_dict()` and `case_id`. Exceptions become failure rows.
        `cache_dir`: where generated data may be cached (the run's references folder). A user's subclass
        defines it; the built-in kinds (`ODEExperiment`, `TrainingProblem`, the toy) are run by
        `gqbench.training.run_problem`, which calls this for any other kind."""
        raise NotImplementedError(f"{type(self).__name__} defines no run(*, case, cache_dir); define it")


@dataclasses.dataclass(frozen=True)
class TrainingProblem(AbstractTrainingProblem):
    """A training experiment in a module: `module` (a name, imported only when a case runs, by
    `gqbench.training.run_problem`) provides `run_case(case, problem, cache_dir) -> (rows, tables)`."""

    name: str
    description: str
    module: str
    methods: tuple[str, ...]
    default_width: int
    default_batch: int
    default_epochs: int
    noise_axis: bool = False  # the `ncosines` axis applies to torch_gq
    options: tuple[tuple[str, object], ...] = ()  # problem settings (data sizes, steps)
    default_lr: float | None = None


TRAINING_PROBLEMS: dict[str, AbstractTrainingProblem] = {}


def register_training_problem(problem: AbstractTrainingProblem, *, replace: bool = False) -> AbstractTrainingProblem:
    """Add `problem` under `problem.name` (a worker finds it if its module is imported by this package)."""
    if problem.name in TRAINING_PROBLEMS and not replace:
        raise ValueError(f"training problem {problem.name!r} is already registered; pass replace=True to override it")
    TRAINING_PROBLEMS[problem.name] = problem
    return problem


def get_training_problem(name: str) -> AbstractTrainingProblem:
    """A registered training problem, or a user's named "pkg.module:problem" / "path/to/file.py:problem" (an
    instance of an `AbstractTrainingProblem` subclass in that module)."""
    if ":" in name:
        from .user_problems import UserProblemError, training_problem

        problem = training_problem(name)
        if problem is None:
            raise UserProblemError(f"problem {name!r} is not an AbstractTrainingProblem; it cannot train (drop epochs)")
        return problem
    return TRAINING_PROBLEMS[name]


_SDE = dict(module="gqbench.training.sde_ou", methods=("torch_gq", "sde_direct", "sde_adjoint"), noise_axis=True,
            default_width=16, default_batch=40, default_epochs=100)  # fmt: skip
for _p in (
    TrainingProblem("sde_ou", "OU neural SDE, the paper's data sizes: 200 x 45 train, 20 x 45 val paths", **_SDE),
    TrainingProblem(
        "sde_ou_small",
        "OU neural SDE on 40 x 45 train, 10 x 45 val paths (quick runs)",
        **_SDE,
        options=(("n_train", 40), ("n_val", 10)),
    ),  # fmt: skip
):
    register_training_problem(_p)

from . import experiments as _experiments  # noqa: E402, F401 -- registers the paper's experiments on import
