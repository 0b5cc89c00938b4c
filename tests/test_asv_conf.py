"""asv.conf.json: only keys asv 0.6 knows (it ignores unknown ones silently), and the settings this
project relies on (no-deps wheel build, spawn, paths under .asv/ and reports/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "asv.conf.json"

# asv 0.6.x: the attributes of asv.config.Config(), plus "version" (the file format) and
# "build_cache_size" (read with getattr in asv/build_cache.py).
KNOWN_KEYS = {
    "version",
    "project",
    "project_url",
    "repo",
    "repo_subdir",
    "branches",
    "pythons",
    "matrix",
    "exclude",
    "include",
    "env_dir",
    "benchmark_dir",
    "results_dir",
    "html_dir",
    "show_commit_url",
    "hash_length",
    "environment_type",
    "install_timeout",
    "default_benchmark_timeout",
    "dvcs",
    "regressions_first_commits",
    "regressions_thresholds",
    "plugins",
    "conda_channels",
    "conda_environment_file",
    "build_command",
    "install_command",
    "uninstall_command",
    "launch_method",
    "build_cache_size",
}
MATRIX_KEYS = {"req", "env", "env_nobuild"}


def load_jsonc(text: str) -> dict:
    """asv's format: JSON plus whole-line // comments (the only comments this file may use)."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("//")]
    return json.loads("\n".join(lines))


@pytest.fixture(scope="module")
def conf() -> dict:
    return load_jsonc(CONF.read_text())


def unknown_keys(conf: dict) -> list[str]:
    bad = sorted(set(conf) - KNOWN_KEYS)
    bad += [f"matrix.{k}" for k in sorted(set(conf.get("matrix", {})) - MATRIX_KEYS)]
    return bad


def test_only_known_keys(conf):
    assert unknown_keys(conf) == [], "asv ignores unknown keys silently; fix the spelling or remove them"


def test_unknown_key_is_caught():
    assert unknown_keys({"repo": ".", "result_dir": "x", "matrix": {"reqs": {}}}) == ["result_dir", "matrix.reqs"]


def test_known_keys_match_installed_asv():
    asv_config = pytest.importorskip("asv.config")
    attrs = set(vars(asv_config.Config()))
    assert attrs <= KNOWN_KEYS, f"asv has new keys: {sorted(attrs - KNOWN_KEYS)}"
    assert KNOWN_KEYS - attrs == {"version", "build_cache_size"}


def test_installed_asv_loads_it(conf):
    asv_config = pytest.importorskip("asv.config")
    loaded = asv_config.Config.load(str(CONF))
    assert loaded.launch_method == "spawn" and loaded.environment_type == "virtualenv"


def test_settings_this_project_relies_on(conf):
    assert conf["environment_type"] == "virtualenv"
    assert conf["launch_method"] == "spawn"
    assert conf["repo"] == "." and conf["branches"] == ["main"]
    req = conf["matrix"]["req"]
    assert req["torch"] == "2.13.0" and req["torchdiffeq"] == "0.2.5" and req["diffrax"] == "0.7.2"
    assert {"jax", "equinox", "numpy", "pandas", "pyarrow"} <= set(req)
    assert all("--no-deps" in cmd for cmd in conf["build_command"] + conf["install_command"])
    assert conf["results_dir"].startswith(".asv/") and conf["env_dir"].startswith(".asv/")
    assert conf["html_dir"].startswith("reports/")
    assert (ROOT / conf["benchmark_dir"] / "__init__.py").exists()
