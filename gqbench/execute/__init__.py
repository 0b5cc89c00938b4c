"""Where cases run: shards of a grid (`shard`), merging shard folders (`merge`), a Ray cluster
(`ray_executor`). Every executor starts cases through `gqbench.measurement.launch.Worker` via `run_group`."""
