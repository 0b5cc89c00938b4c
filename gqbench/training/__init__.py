"""Training runs as cases: a case with `epochs` set trains a model in the worker instead of timing one gradient.

Same runner, same failure rows; a training case gives one row in `results.parquet` (medians over its epochs)
and its per-epoch rows in `epochs.parquet` (plus any further tables, e.g. `sde_bands.parquet`), with the case
fields on every row. Import-light: torch loads only when a case runs.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class TrainingProblem:
    """A training experiment: `module` provides `run_case(case, problem, cache_dir) -> (rows, tables)`."""

    name: str
    description: str
    module: str
    methods: tuple[str, ...]
    default_width: int
    default_batch: int
    default_epochs: int
    noise_axis: bool = False  # the `ncosines` axis applies to torch_gq
    options: tuple[tuple[str, object], ...] = ()  # problem settings (data sizes, steps)

    def unsupported(self, method: str) -> str | None:
        if method not in self.methods:
            return f"{self.name} trains {', '.join(self.methods)}, not {method}"
        return None

    def run(self, case, cache_dir=None):
        return importlib.import_module(self.module).run_case(case, self, cache_dir)


_SDE = dict(module="gqbench.training.sde_ou", methods=("torch_gq", "sde_direct", "sde_adjoint"), noise_axis=True,
            default_width=16, default_batch=40, default_epochs=100)  # fmt: skip
TRAINING_PROBLEMS: dict[str, TrainingProblem] = {
    p.name: p
    for p in (
        TrainingProblem("sde_ou", "OU neural SDE, the paper's data sizes: 200 x 45 train, 20 x 45 val paths", **_SDE),
        TrainingProblem(
            "sde_ou_small",
            "OU neural SDE on 40 x 45 train, 10 x 45 val paths (quick runs)",
            **_SDE,
            options=(("n_train", 40), ("n_val", 10)),
        ),  # fmt: skip
    )
}
