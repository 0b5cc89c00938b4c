"""asv benchmarks for gqbench (see docs/scale-out.md, "asv, nox and micro-benchmarks"). Timing and memory come
from gqbench's own `prepare` / `run_grid` / `measure`; nothing here measures on its own."""
