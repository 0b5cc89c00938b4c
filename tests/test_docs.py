"""The docs are checked, not hoped: the site builds offline with `mkdocs build --strict`, every `gqbench` command
in the README and the pages parses with gqbench's own parser (a renamed flag fails here), and the blocks marked
to run do run, at the smallest sizes.

The mark is an HTML comment on the line before a fenced block (invisible on the page):
    <!-- run -->           run the block as written (python: the test's interpreter; bash: bash -e), from the repo root
    <!-- run: COMMAND -->  run COMMAND (bash) instead; {block} is the block saved to a file (.py/.toml/...),
                           {tmp} a temporary folder
`gqbench` and `python` in a command are this interpreter's (shims on PATH), with this checkout on PYTHONPATH.
Without mkdocs the build test skips locally and fails when CI=true (.ci/run installs the [docs] extra).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EXT = {"python": "py", "toml": "toml", "bash": "sh", "yaml": "yaml"}
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*run(?::\s*(.*?))?\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    run: str | None  # None: not marked; "": run as written; else the command to run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        mark = MARK.match(lines[start - 1]) if start > 0 else None
        run = None if mark is None else (mark.group(1) or "")
        out.append(Block(path, start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n", run))
        i = j + 1
    return out


ALL_BLOCKS = [b for p in PAGES for b in blocks(p)]
MARKED = [b for b in ALL_BLOCKS if b.run is not None]


def _require_mkdocs():
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"{', '.join(missing)} not installed (pip install -c constraints.txt -e '.[docs]')"
        if IN_CI:
            pytest.fail(f"CI=true but {why}: .ci/run must install the [docs] extra")
        pytest.skip(why)


def test_mkdocs_builds_strict_offline(tmp_path):
    _require_mkdocs()
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for page in ("index.html", "your-model/index.html", "api/impls/index.html", "api/gqbench/index.html"):
        assert (tmp_path / page).is_file(), page
    # The API pages were generated from the docstrings, not left as `::: name` lines.
    api = (tmp_path / "api/gqbench/index.html").read_text()
    assert "run_grid" in api and ":::" not in api
    assert "odeint_adjoint_gq" in (tmp_path / "api/impls/index.html").read_text()
    # Offline: the theme loads no web fonts.
    assert "fonts.googleapis.com" not in (tmp_path / "index.html").read_text()


# --------------------------------------------------------------------------- commands in bash blocks


def _commands(block: Block) -> list[tuple[str, list[str]]]:
    """(the line, its argv) for each command of a bash block (and `run:` steps of a yaml block)."""
    text = re.sub(r"\$\{\{[^}]*\}\}", "1", block.text)  # GitHub Actions expressions
    text = text.replace("\\\n", " ")
    out = []
    for line in text.split("\n"):
        if block.lang == "yaml":
            m = re.match(r"^\s*-?\s*run:\s*(.*)$", line)
            if not m:
                continue
            line = m.group(1)
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        cmd: list[str] = []
        for tok in [*tokens, ";"]:
            if tok in ("&&", ";", "||", "|"):
                if cmd:
                    out.append((line.strip(), cmd))
                cmd = []
                continue
            if not cmd and re.match(r"^[A-Z_]+=", tok):  # an environment assignment before the command
                continue
            tok = tok.strip("[]")  # "[--dry-run]": an optional flag in a synopsis
            if tok and tok not in ("...", "…"):
                cmd.append(tok)
    return out


def _strict_parser() -> argparse.ArgumentParser:
    from gqbench.cli import _parser

    parser = _parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False  # "--thread" must not pass for "--threads"
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    return parser


def _gqbench_argv(argv: list[str]) -> list[str] | None:
    if argv[0] == "gqbench":
        return argv[1:]
    if argv[:3] in (["python", "-m", "gqbench"], ["python", "-m", "gqbench.cli"]):
        return argv[3:]
    return None


def _script_help(script: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert out.returncode == 0, f"{script} --help failed: {out.stderr[-1000:]}"
    return out.stdout


def nox_sessions() -> set[str]:
    """Session names in noxfile.py, read from its decorators (loading it again would register them twice)."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "noxfile.py").read_text())):
        for dec in getattr(node, "decorator_list", []):
            if isinstance(dec, ast.Call) and ast.unparse(dec.func) == "nox.session":
                given = [k.value.value for k in dec.keywords if k.arg == "name"]
                names.add(given[0] if given else node.name)
    return names


def test_every_documented_command_parses():
    """Each `gqbench ...` command in the README and the pages parses (no abbreviations); each `nox -s NAME` is a
    session; each `python benchmarks/X.py --flag` uses flags that script's --help lists."""
    parser = _strict_parser()
    sessions = nox_sessions()
    helps: dict[str, str] = {}
    problems, seen = [], 0
    for block in ALL_BLOCKS:
        if block.lang not in ("bash", "yaml"):
            continue
        for line, argv in _commands(block):
            args = _gqbench_argv(argv)
            if args is not None:
                seen += 1
                err = io.StringIO()
                try:
                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                        parser.parse_args(args)
                except SystemExit as exc:
                    if exc.code:
                        problems.append(f"{block.where}: {line!r}: {err.getvalue().strip().splitlines()[-1]}")
            elif argv[0] == "nox" and "-s" in argv:
                name = argv[argv.index("-s") + 1]
                if name not in sessions:
                    problems.append(f"{block.where}: {line!r}: no nox session {name!r} in noxfile.py")
            elif argv[0] == "python" and len(argv) > 1 and argv[1].startswith("benchmarks/"):
                script = argv[1]
                if not (ROOT / script).is_file():
                    problems.append(f"{block.where}: {line!r}: {script} does not exist")
                    continue
                flags = [a.split("=")[0] for a in argv[2:] if a.startswith("--")]
                if flags:
                    helps.setdefault(script, _script_help(script))
                    problems += [f"{block.where}: {line!r}: {script} has no {f}" for f in flags
                                 if not re.search(rf"(^|[\s,\[]){re.escape(f)}\b", helps[script])]  # fmt: skip
    assert seen >= 20, f"only {seen} gqbench commands found in the docs: is the block parser broken?"
    problems += _inline_problems(parser, sessions, helps)
    assert not problems, "\n".join(problems)


def _prose(path: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


def _inline_problems(parser, sessions: set, helps: dict) -> list[str]:
    """Commands quoted in the prose (`gqbench compare A B --absolute`) are often partial, so only their names
    and flags are checked: the subcommand exists and has each --flag; the nox session and the script exist."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    problems = []
    for path in PAGES:
        for span in re.findall(r"`([^`\n]+)`", _prose(path)):
            where = f"{path.relative_to(ROOT)}: `{span}`"
            words = span.split()
            flags = [re.sub(r"[=,.;:)\]]+.*$", "", w) for w in words if w.startswith("--") and len(w) > 2]
            if words[0] == "gqbench" and len(words) > 1 and re.match(r"^[a-z]+$", words[1]):
                if words[1] not in subs:
                    problems.append(f"{where}: gqbench has no command {words[1]!r}")
                    continue
                known = subs[words[1]]._option_string_actions
                problems += [f"{where}: gqbench {words[1]} has no {f}" for f in flags if f not in known]
            elif words[:2] == ["nox", "-s"] and len(words) > 2 and words[2] not in sessions:
                problems.append(f"{where}: no nox session {words[2]!r}")
            elif words[0] == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
                if not (ROOT / words[1]).is_file():
                    problems.append(f"{where}: {words[1]} does not exist")
                elif flags:
                    helps.setdefault(words[1], _script_help(words[1]))
                    problems += [f"{where}: {words[1]} has no {f}" for f in flags
                                 if not re.search(rf"(^|[\s,\[]){re.escape(f)}\b", helps[words[1]])]  # fmt: skip
    return problems


def test_a_renamed_flag_fails_the_check(tmp_path):
    """The parse check can fail: a flag gqbench does not have is caught, and so is an abbreviation."""
    parser = _strict_parser()
    for argv in (["run", "--preset", "smoke", "--out", "x", "--repeat", "2"], ["advise", "m.py:make", "--rtols", "1"]):
        with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
            parser.parse_args(argv)


# --------------------------------------------------------------------------- blocks marked to run


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> dict:
    """PATH with `gqbench` and `python` as this interpreter, this checkout first on PYTHONPATH."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, target in (("gqbench", f'"{sys.executable}" -m gqbench.cli'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        shim.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath, MPLBACKEND="Agg")


def test_marked_blocks_are_found():
    where = {b.path.name for b in MARKED}
    assert {"README.md", "gq-adjoint.md", "your-model.md", "grids.md", "sde.md"} <= where, where
    assert all(b.lang in EXT for b in MARKED), [(b.where, b.lang) for b in MARKED if b.lang not in EXT]


@pytest.mark.parametrize("block", MARKED, ids=[b.where for b in MARKED])
def test_marked_block_runs(block: Block, tmp_path, shims):
    if block.run:
        src = tmp_path / f"block.{EXT[block.lang]}"
        src.write_text(block.text)
        cmd = ["bash", "-euo", "pipefail", "-c", block.run.replace("{block}", str(src)).replace("{tmp}", str(tmp_path))]
    elif block.lang == "python":
        cmd = [sys.executable, "-c", block.text]
    elif block.lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", block.text]
    else:
        pytest.fail(f"{block.where}: a {block.lang} block needs '<!-- run: COMMAND -->' to say how to run it")
    out = subprocess.run(cmd, cwd=ROOT, env=shims, capture_output=True, text=True, timeout=240)
    missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", out.stderr)
    if out.returncode != 0 and missing and not IN_CI:  # an extra this checkout did not install (CI has them all)
        pytest.skip(f"{block.where} needs {missing.group(1)} (install the extras of the README's set-up line)")
    assert out.returncode == 0, f"{block.where}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


# --------------------------------------------------------------------------- what must stay in step


def test_images_are_used_and_small():
    used = {m for p in PAGES for m in re.findall(r"\]\((?:docs/)?(img/[^)\s]+)\)", p.read_text())}
    have = {f"img/{p.name}" for p in (DOCS / "img").iterdir()}
    assert used == have, f"unused: {sorted(have - used)}, missing: {sorted(used - have)}"
    total = sum((DOCS / p).stat().st_size for p in have)
    assert total < 1_000_000, f"docs/img holds {total} bytes; keep the images under 1 MB"


def test_api_page_lists_every_public_name():
    import gqbench

    page = (DOCS / "api" / "gqbench.md").read_text()
    listed = set(re.findall(r"^::: gqbench\.[\w.]+\.(\w+)$", page, flags=re.M))
    assert listed == set(gqbench.__all__), f"add to docs/api/gqbench.md: {sorted(set(gqbench.__all__) - listed)}"


def test_results_schema_names_every_column():
    from gqbench.results.tables import COLUMNS

    page = (DOCS / "results-schema.md").read_text()
    missing = [c for c in COLUMNS if f"`{c}`" not in page]
    assert not missing, f"document these results columns in docs/results-schema.md: {missing}"


def test_ci_installs_what_the_readme_says():
    """.ci/run sets up as the README does (the same extras, the docs extra among them) and runs its test command."""
    pattern = r'pip install (?:-q )?-c constraints.txt -e "\.\[([\w,]+)\]"'
    readme = re.findall(pattern, (ROOT / "README.md").read_text())
    ci = re.findall(pattern, (ROOT / ".ci" / "run").read_text())
    assert readme and ci and readme[0] == ci[0], (readme, ci)
    assert "docs" in ci[0].split(",")
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("\npytest")
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200, "the README is the front door: <= ~200 lines"


def test_readme_links_resolve():
    """The README's links into docs/ (mkdocs checks the pages' own links; the README is outside the site)."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local
    assert not [link for link in local if not (ROOT / link).exists()], "README links to missing files"
