"""The package as a user installs it, and the shape of its code.

- A wheel built from this tree carries everything that changes behaviour (``base.yaml``, the sample data), and the
  CLI run from outside the repository on that wheel resolves exactly the configuration a checkout resolves.
- Modules stay small and readable; transformers/peft/bitsandbytes are imported only at the edges.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "titlegen"
# The edges: the only modules that import the model libraries (README: Layout).
THIRD_PARTY = {"transformers", "peft", "bitsandbytes"}
EDGES = {"model/backbone.py", "model/lora.py", "model/attention.py", "model/merge.py", "model/fused.py",
         "generate/engines.py"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 250, 50


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_model_libraries_are_imported_only_at_the_edges():
    found = {str(p.relative_to(PACKAGE)) for p in _modules() if _imports(ast.parse(p.read_text())) & THIRD_PARTY}
    assert found <= EDGES, f"transformers/peft/bitsandbytes imported outside the edges: {sorted(found - EDGES)}"


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in _modules():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long_modules and not long_functions, long_modules + long_functions


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps`` of a copy of the tree, unpacked: the files a user's install gets."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "titlegen", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
           str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    [wheel] = (tmp / "dist").glob("titlegen-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp / "site")
    return tmp / "site"


def test_wheel_carries_the_defaults_and_the_sample(unpacked_wheel):
    for name in ("base.yaml", "sample/trn.json", "sample/titles.csv", "cli.py", "model/module.py"):
        assert (unpacked_wheel / "titlegen" / name).is_file(), name
    assert (unpacked_wheel / "titlegen" / "base.yaml").read_text() == (PACKAGE / "base.yaml").read_text()


def _print_config(cwd: Path, pythonpath: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1"}
    code = ("import sys, titlegen; print(titlegen.__file__, file=sys.stderr); "
            "from titlegen.cli import main; main(['fit', '--print_config'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(pythonpath) in proc.stderr.splitlines()[0], "the CLI must run from the package under test"
    return proc.stdout


def test_installed_wheel_resolves_the_same_configuration_outside_the_repository(unpacked_wheel, tmp_path):
    outside = _print_config(tmp_path, unpacked_wheel)
    inside = _print_config(ROOT, ROOT)
    assert outside == inside
    for setting in ("use_distributed_sampler: false", "num_sanity_val_steps: 2", "ModelCheckpoint",
                    "every_n_train_steps: 25", "enable_model_summary: false"):
        assert setting in outside, setting  # base.yaml's trainer settings, not Lightning's bare defaults


def test_configs_base_yaml_is_the_packaged_file():
    assert (ROOT / "configs" / "base.yaml").resolve() == (PACKAGE / "base.yaml").resolve()
