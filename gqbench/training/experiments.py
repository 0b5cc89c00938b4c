"""Older import path of the paper's experiments' definitions: they live in `gqbench.define.experiments`
(user files and asv benchmarks across commits import them from here)."""

from ..define.experiments import (  # noqa: F401 -- re-exported
    DATA_SEED,
    G1D,
    ODE_METHODS,
    TRAIN_METHODS,
    Dataset,
    Images,
    ODEExperiment,
    Sines,
    Spheres,
    modules,
)
