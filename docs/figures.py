"""Static images of the report's key figures for the docs pages: `python docs/figures.py RESULTS_DIR`.

RESULTS_DIR is a folder `gqbench run` wrote (its results.parquet); the PNGs go to docs/img/ (or --out).
The data go through the report's own `summarize`/`speedups` (gqbench.report.figures), so an image shows what
the HTML report shows for that run; only the drawing is matplotlib's, which needs no browser (plotly's
static export needs kaleido and Chrome). matplotlib comes with the [mali] and [docs] extras.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

IMG = Path(__file__).resolve().parent / "img"
DPI = 72  # small files: the images sit inside a text column
# The images the pages embed; tests/test_docs.py checks each exists and is referenced.
NAMES = ("backward-time.png", "speedup.png", "peak-memory.png", "work-precision.png")


def _log(ax) -> None:
    """Log-log axes; x labelled on decades only (its minor labels collide when the range is narrow)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _lines(ax, summary: pd.DataFrame, y: str, ylabel: str) -> None:
    for label, d in summary.sort_values("width").groupby("label", sort=True):
        ax.plot(d["width"], d[y], marker="o", label=label)
    _log(ax)
    ax.set_xlabel("width")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def _save(fig, out: Path, name: str) -> Path:
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: reruns differ only in data
    plt.close(fig)
    return path


def _title(summary: pd.DataFrame, results_dir: Path) -> str:
    """What the image shows and where it was measured: the grid's name, the machine, the date."""
    first = summary.iloc[0]
    probs = ", ".join(sorted(summary["problem"].astype(str).unique()))
    title = f"{probs}; {first['solver']} rtol {first['rtol']:g}, {first['dtype']}, {first['device']}"
    env_path = Path(results_dir) / "environment.json"
    if env_path.exists():
        env = json.loads(env_path.read_text())
        grid = (env.get("spec") or {}).get("name", "?")
        title += f"\ngrid {grid!r}, {env.get('cpu_count', '?')} CPUs, {str(env.get('date', ''))[:10]}"
    return title


def write_figures(results_dir: str | Path, out: str | Path = IMG) -> list[Path]:
    """The docs' images from one results folder; one tolerance (the loosest) so lines do not mix tolerances."""
    from gqbench import load_results
    from gqbench.report.figures import speedups, summarize

    summary = summarize(load_results(results_dir))
    summary = summary[summary["epochs"].isna()] if "epochs" in summary else summary
    if summary.empty:
        raise SystemExit(f"{results_dir}: no finished gradient cases; run e.g. gqbench run --preset smoke --out DIR")
    summary = summary[summary["rtol"] == summary["rtol"].max()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = _title(summary, Path(results_dir))
    paths = []

    fig, ax = plt.subplots(figsize=(8, 3.6))
    _lines(ax, summary, "bwd_s", "backward time, s (median)")
    ax.set_title(f"Backward time vs width\n{title}", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    paths.append(_save(fig, out, NAMES[0]))

    sp = speedups(summary)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if not sp.empty:
        sp = sp.assign(width=sp["width"].astype(int))
        table = sp.pivot_table(index="pair", columns="width", values="speedup_bwd", aggfunc="median")
        table.plot.barh(ax=ax, width=0.8)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(title="width", fontsize=7)
    ax.set_xlabel("backward speed-up: baseline time / GQ time (> 1: GQ faster)")
    ax.set_ylabel("")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"GQ's backward speed-up over each baseline\n{title}", fontsize=9)
    paths.append(_save(fig, out, NAMES[1]))

    fig, ax = plt.subplots(figsize=(8, 3.6))
    _lines(ax, summary.assign(peak_mem_mib=summary["peak_mem_mib"].clip(lower=1e-3)), "peak_mem_mib", "peak MiB")
    ax.set_title(f"Peak memory of forward + backward vs width\n{title}", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    paths.append(_save(fig, out, NAMES[2]))

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, d in summary.groupby("label", sort=True):
        ax.scatter(d["total_s"], d["grad_rel_err"], label=label, s=25)
    _log(ax)
    ax.set_xlabel("forward + backward time, s (median)")
    ax.set_ylabel("gradient relative error vs float64")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Work-precision: error against time, every width\n{title}", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    paths.append(_save(fig, out, NAMES[3]))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results_dir", help="a folder written by gqbench run (results.parquet)")
    ap.add_argument("--out", default=str(IMG), help="where the PNGs go (default: docs/img)")
    args = ap.parse_args(argv)
    for p in write_figures(args.results_dir, args.out):
        print(f"{p} ({p.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
