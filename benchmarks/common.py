"""The asv suite's plumbing: which points it runs, and how each becomes a gqbench `Case`.

Where things come from:
- The grid is gqbench's `history` preset, read from *this checkout's* file (not from the installed
  gqbench), so asv's parameter lists -- which asv indexes by position -- are the same for every
  commit it installs. The [axes] table gives widths and tolerances, each [[grid]] table methods
  and, for quadrature methods, gtol/quad_order; a "method" parameter is the harness' own
  `Case.label` ("torch_adjoint", "torch_gq[n=2]"), so no method x quadrature pair is invalid.
- Each point becomes a `Case` through the *installed* gqbench's `parse_spec` (its own expansion
  rules); asv times `prepare(case)`'s forward()/backward(), and the tracked figures come from
  `run_grid` (one fresh worker process per case, as `gqbench run` does).
- Older commits: whatever their gqbench lacks (the package, a method, a function) turns into
  NotImplementedError in setup, which asv records as skipped.

Environment switches:
- GQBENCH_ASV_FULL=1: the whole grid. Default: a small deterministic subsample (`default_points`).
- GQBENCH_ASV_DEVICES=cpu,cuda: the devices (default cpu); cuda points skip without CUDA.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET_NAME = "history"
PRESET_PATH = ROOT / "gqbench" / "define" / "presets" / f"{PRESET_NAME}.toml"
FULL_ENV = "GQBENCH_ASV_FULL"
DEVICES_ENV = "GQBENCH_ASV_DEVICES"
# Bump when this suite's own meaning changes (what a benchmark measures, not the grid);
# gqbench.HARNESS_VERSION is appended, so a harness change also invalidates old asv results.
SUITE_VERSION = "1"
QUAD_AXES = ("quadrature", "gtol", "quad_order")
# Keys a [[grid]] table may set; width/rtol belong to [axes] (they are asv parameters of their own).
GRID_KEYS = ("method", *QUAD_AXES)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class GridError(ValueError):
    """The preset does not have the shape this suite relies on (see the preset's header)."""


def read_grid(path: Path = PRESET_PATH) -> tuple[dict, dict[str, dict]]:
    """-> (the parsed preset, {label: single-method axes for parse_spec}), labels in preset order."""
    data = tomllib.loads(path.read_text())
    axes = data.get("axes", {})
    for key in ("width", "rtol"):
        if not isinstance(axes.get(key), list) or not axes[key]:
            raise GridError(f"{path.name}: [axes] {key} must be a non-empty list (it is an asv parameter)")
    for key in ("atol", "device", "batch", "backward_state", "warm_start", "tolerances"):
        if key in axes:
            raise GridError(f"{path.name}: [axes] {key} is not supported by the asv suite; remove it")
    points: dict[str, dict] = {}
    for i, block in enumerate(data.get("grid", [{}])):
        extra = sorted(set(block) - set(GRID_KEYS))
        if extra:
            raise GridError(f"{path.name}: [[grid]] #{i + 1} sets {', '.join(extra)}; only {', '.join(GRID_KEYS)}")
        merged = dict(axes, **block)
        shared = {k: v for k, v in merged.items() if k not in QUAD_AXES and k != "method"}
        settings = []
        if any(k in block for k in QUAD_AXES):
            # The same rule choice as gqbench's grid: without `quadrature`, adaptive plus what is named.
            named = ["gtol"] * ("gtol" in block) + ["fixed"] * ("quad_order" in block)
            rules = block.get("quadrature", ["adaptive", *named])
            if "adaptive" in rules:
                settings.append((dict(quadrature=["adaptive"]), "adaptive"))
            settings += [(dict(quadrature=["gtol"], gtol=[g]), f"gtol={g:g}") for g in block.get("gtol", [])]
            settings += [(dict(quadrature=["fixed"], quad_order=[n]), f"n={n}") for n in block.get("quad_order", [])]
        for method in merged.get("method", []):
            for quad, opt in settings or [({}, "")]:
                label = f"{method}[{opt}]" if opt else method
                if label in points:
                    raise GridError(f"{path.name}: {label} appears twice")
                points[label] = dict(shared, method=[method], **quad)
    if not points:
        raise GridError(f"{path.name}: no methods; add method = [...] to a [[grid]] table")
    return data, points


PRESET, POINTS = read_grid()
LABELS = tuple(POINTS)
METHODS_IN_PRESET = tuple(dict.fromkeys(p["method"][0] for p in POINTS.values()))
WIDTHS = tuple(sorted(PRESET["axes"]["width"]))
RTOLS = tuple(sorted(PRESET["axes"]["rtol"], reverse=True))  # loosest first
DEVICES = tuple(d.strip() for d in os.environ.get(DEVICES_ENV, "cpu").split(",") if d.strip()) or ("cpu",)
FULL = _flag(FULL_ENV)


def is_quadrature(label: str) -> bool:
    return any(k in POINTS[label] for k in QUAD_AXES)


def method_of(label: str) -> str:
    return POINTS[label]["method"][0]


def default_points() -> set[tuple[str, int, float]]:
    """The default subsample, (label, width, rtol), all at the loosest tolerance: each method's
    first label at the smallest width; every label of the first quadrature method (torch_gq, the
    code under test) at the two smallest widths; and its first label at the largest width.

    Deterministic and close to a cross product on purpose: asv starts a fresh interpreter for every
    parameter combination, skipped ones included, so a scattered random sample would pay for most
    of the product; JAX points also pay ~5 s of compilation per process."""
    rtol = RTOLS[0]
    quad = [label for label in LABELS if is_quadrature(label)]
    focus = method_of(quad[0]) if quad else None
    points, seen = set(), set()
    for label in LABELS:
        method = method_of(label)
        if method not in seen or method == focus:
            points.add((label, WIDTHS[0], rtol))
            seen.add(method)
        if method == focus:
            points.add((label, WIDTHS[min(1, len(WIDTHS) - 1)], rtol))
    if quad:
        points.add((quad[0], WIDTHS[-1], rtol))
    return points


def _axes() -> dict[str, list]:
    """asv's parameters, name -> values, in one place (params and param_names come from it)."""
    if FULL:
        return dict(method=list(LABELS), width=list(WIDTHS), rtol=list(RTOLS), device=list(DEVICES))
    pts = default_points()
    return dict(
        method=[label for label in LABELS if any(p[0] == label for p in pts)],
        width=sorted({w for _, w, _ in pts}),
        rtol=sorted({r for _, _, r in pts}, reverse=True),
        device=list(DEVICES),
    )


AXES = _axes()
PARAM_NAMES = list(AXES)
PARAMS = [list(v) for v in AXES.values()]
SELECTED = {(m, w, r) for m in LABELS for w in WIDTHS for r in RTOLS} if FULL else default_points()


def _gqbench():
    try:
        import gqbench
    except ImportError as exc:
        raise NotImplementedError(f"gqbench is not importable at this commit: {exc}") from None
    return gqbench


def harness_version() -> str:
    try:
        import gqbench

        return str(getattr(gqbench, "HARNESS_VERSION", "0"))
    except ImportError:
        return "0"


VERSION = f"{SUITE_VERSION}+harness.{harness_version()}"


def build_case(label: str, width: int, rtol: float, device: str):
    """The gqbench `Case` for one asv point, built by the installed gqbench's `parse_spec`.
    NotImplementedError (asv: skipped) for points outside the selection or unknown to this commit."""
    if (label, width, rtol) not in SELECTED:
        raise NotImplementedError(f"not in the default asv subsample; set {FULL_ENV}=1 for the whole grid")
    gq = _gqbench()
    parse_spec = getattr(gq, "parse_spec", None)
    if parse_spec is None:
        raise NotImplementedError("this commit's gqbench has no parse_spec")
    axes = dict(POINTS[label], width=[width], rtol=[rtol], device=[device])
    try:
        cases = parse_spec({"axes": axes}, source=f"asv point {label}").cases
    except ValueError as exc:  # GridSpecError: e.g. a method this commit does not register
        raise NotImplementedError(f"this commit's gqbench cannot build {label}: {exc}") from None
    if len(cases) != 1 or getattr(cases[0], "label", label) != label:
        got = [getattr(c, "label", c) for c in cases]
        raise RuntimeError(f"asv point {label} expanded to {got}; benchmarks/common.py and gqbench disagree")
    return cases[0]


def _settings(gq):
    run = PRESET.get("run", {})
    return gq.RunSettings(**run) if hasattr(gq, "RunSettings") else None


# --- time_*: a prepared run per process (asv may call setup before every timed call) -------------

_RUNS: dict = {}


def prepared_run(case, cache_dir=None):
    """`gqbench.prepare(case, cache_dir)` plus the preset's warm-up calls, once per process. `cache_dir`: where
    trained states (and references) live, for cases at trained weights."""
    run = _RUNS.get(case)
    if run is None:
        gq = _gqbench()
        skip = getattr(gq, "Skip", None)
        try:
            run = gq.prepare(case) if cache_dir is None else gq.prepare(case, cache_dir)
        except Exception as exc:
            if skip is not None and isinstance(exc, skip):
                raise NotImplementedError(str(exc)) from None
            raise
        settings = _settings(gq)
        for _ in range(settings.warmup if settings else 1):
            run.forward()
            run.backward()
        _RUNS.clear()
        _RUNS[case] = run
    return run


# --- track_*: one gqbench run over the selected points, shared by every track_ benchmark ---------

METRICS = ("peak_mem_bytes", "nfe_fwd", "nfe_bwd", "grad_rel_err", "fwd_s", "bwd_s")


def point_key(label: str, width: int, rtol: float, device: str) -> str:
    return f"{label}|{width}|{rtol!r}|{device}"


def reference_dir(gq) -> Path:
    """Float64 reference gradients, shared across commits while the problems and the reference
    solver are unchanged (keyed by the installed files that define them)."""
    h = hashlib.sha1()
    pkg = Path(gq.__file__).parent
    for names in (("define/problems.py", "_problems.py"), ("measurement/measure.py", "_measure.py")):
        p = next((pkg / n for n in names if (pkg / n).exists()), None)  # today's layout, or the flat one
        h.update(p.read_bytes() if p is not None else b"")
    base = Path(os.environ.get("ASV_CONF_DIR") or ROOT) / ".asv" / "references"
    return base / h.hexdigest()[:12]


def measure_selected() -> dict[str, dict]:
    """{point_key: {metric: median over repeats} or {"skip": reason}} for every selected point,
    measured the way `gqbench run` measures (fresh worker per case) when the commit has run_grid."""
    gq = _gqbench()
    out: dict[str, dict] = {}
    cases = {}
    for label, width, rtol in sorted(SELECTED):
        for device in DEVICES:
            key = point_key(label, width, rtol, device)
            try:
                cases[key] = build_case(label, width, rtol, device)
            except NotImplementedError as exc:
                out[key] = {"skip": str(exc)}
    if not cases:
        return out
    settings = _settings(gq)
    if hasattr(gq, "run_grid"):
        with tempfile.TemporaryDirectory(prefix="gqbench-asv-") as tmp:
            df = gq.run_grid(
                list(cases.values()), tmp, settings=settings, progress=False, reference_dir=reference_dir(gq)
            )
        rows_by_id = {cid: g.to_dict("records") for cid, g in df.groupby("case_id")}
    else:  # an older harness: measure in this process
        rows_by_id = {}
        for case in cases.values():
            rows_by_id[case.case_id] = gq.measure(case, repeats=settings.repeats if settings else 3)
    for key, case in cases.items():
        rows = rows_by_id.get(case.case_id, [])
        ok = [r for r in rows if r.get("status", "ok") == "ok"]
        if not ok:
            why = "; ".join(sorted({f"{r.get('status')}: {r.get('error')}" for r in rows})) or "no rows"
            out[key] = {"skip": f"gqbench recorded no ok row: {why}"}
            continue
        out[key] = {m: _median([r.get(m) for r in ok]) for m in METRICS}
    return out


def _median(values) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else math.nan
