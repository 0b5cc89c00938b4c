"""asv track_* benchmarks: gqbench's own figures for each point (peak memory of forward+backward,
NFE, gradient error vs the float64 reference), medians over the preset's repeats.

One `setup_cache` runs every selected point through `gqbench.run_grid` (one fresh worker process
per case, exactly as `gqbench run` does); each track_* then reads its number. asv's own peakmem_*
would be the RSS of the whole benchmark process (torch's import included), so there is none here.
"""

from __future__ import annotations

from . import common


class Measured:
    params = common.PARAMS
    param_names = common.PARAM_NAMES
    version = common.VERSION
    timeout = 600.0

    def setup_cache(self):
        return common.measure_selected()

    setup_cache.timeout = 4 * 3600.0 if common.FULL else 3600.0

    def setup(self, cache, method, width, rtol, device):
        if (method, width, rtol) not in common.SELECTED:
            raise NotImplementedError(f"not in the default asv subsample; set {common.FULL_ENV}=1")
        row = cache.get(common.point_key(method, width, rtol, device), {"skip": "not measured"})
        if "skip" in row:
            raise NotImplementedError(row["skip"])
        self.row = row

    def track_peak_mem(self, cache, method, width, rtol, device):
        return self.row["peak_mem_bytes"]

    track_peak_mem.unit = "bytes"

    def track_nfe_fwd(self, cache, method, width, rtol, device):
        return self.row["nfe_fwd"]

    track_nfe_fwd.unit = "evaluations"

    def track_nfe_bwd(self, cache, method, width, rtol, device):
        return self.row["nfe_bwd"]

    track_nfe_bwd.unit = "evaluations"

    def track_grad_rel_err(self, cache, method, width, rtol, device):
        return self.row["grad_rel_err"]

    track_grad_rel_err.unit = "relative L2 error"
