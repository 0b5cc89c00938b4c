"""What to run: a `Case` (case), the problems and methods it names (problems, methods,
jax_methods), and grids of cases from TOML specs and presets (grid, presets/)."""
