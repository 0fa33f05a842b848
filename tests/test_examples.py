"""Every example runs to the end as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_moe.extras import EXTRAS

pytestmark = pytest.mark.slow  # README: `-m 'not slow'` leaves these out

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path: Path, tmp_path: Path) -> None:
    # In a scratch directory: examples that log write under ./runs.
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


OURS_IMPORTING = {"hf": ("lightning_moe.hf_module", "lightning_moe.integrations")}  # our modules that need an extra
EXTRA_MODULES = {extra: (*modules, *OURS_IMPORTING.get(extra, ())) for extra, modules in EXTRAS.items()}


def _extras_used(source: str) -> set[str]:
    return {extra for extra, modules in EXTRA_MODULES.items()
            for line in source.splitlines() for module in modules
            if line.lstrip().startswith((f"import {module}", f"from {module}"))}


@pytest.mark.parametrize("path", [p for p in EXAMPLES if _extras_used(p.read_text())], ids=lambda p: p.name)
def test_an_example_that_needs_an_extra_names_it(path: Path, tmp_path: Path) -> None:
    # Make the extras' modules unimportable (find_spec sees None in sys.modules), as in an install without them.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nfor name in ('transformers', 'peft', 'deepspeed'):\n    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    for extra in _extras_used(path.read_text()):
        assert f"needs the `{extra}` extra" in result.stderr and f"pip install -e '.[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
