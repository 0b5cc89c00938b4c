"""asv benchmarks for gqbench (see README, "asv, nox and micro-benchmarks"). Timing and memory come
from gqbench's own `prepare` / `run_grid` / `measure`; nothing here measures on its own."""
