"""Import direction: what runs (`gqbench.define`) never imports how training runs (`gqbench.training`)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "imports",
    [
        "import gqbench.define",
        "import gqbench.define.grid, gqbench.define.user_problems, gqbench.define.training_problems",
        # Expanding a grid with training problems and a user's training file resolves them all in define/.
        "from gqbench.define.grid import parse_spec; "
        "parse_spec({'axes': {'method': ['torch_gq'], 'problem': ['g1d', 'sde_ou_small', 'toy_gradient',"
        " 'examples/spiral_training.py:experiment'], 'epochs': [1]}})",
    ],
)
def test_define_does_not_import_training(imports):
    code = f"{imports}; import sys; bad = sorted(m for m in sys.modules if m.startswith('gqbench.training')); " \
        "assert not bad, bad"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_old_import_paths_still_work():
    from gqbench.define.experiments import G1D as new
    from gqbench.training import TRAINING_PROBLEMS, get_training_problem
    from gqbench.training.experiments import G1D, ODEExperiment  # noqa: F401 -- examples and asv across commits

    assert G1D is new and get_training_problem("g1d") is TRAINING_PROBLEMS["g1d"]
