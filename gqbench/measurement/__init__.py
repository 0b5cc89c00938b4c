"""One case in one fresh process: the worker (worker) that `launch` starts, `prepare`/`measure`
(measure: timing, peak memory, NFE, gradient error), the profiler (profile) and the environment
record (env). The runner, the profiler and the Ray executor all start cases through `launch`."""
