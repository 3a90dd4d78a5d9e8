"""The wheel installs `trimkit`, `trimkit.adapters` and `trimkit.recipes`, and nothing else.

`adapters/` and `recipes/` are top-level folders of the repository that install as
subpackages of `trimkit` (setuptools ``package-dir``). This test builds the wheel from a
copy of the source tree, installs it into an empty folder and imports it from there, in a
fresh interpreter whose working directory is not the repository, so that neither the
repository nor an editable install can stand in for what the wheel really holds.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import trimkit
from trimkit.version import __version__

ROOT = Path(__file__).resolve().parents[1]

# Build outputs, caches and virtualenvs stay behind when the source tree is copied.
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", ".ci-venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
    "*.pyc", ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache",
)

CHECK = textwrap.dedent(
    """
    import importlib
    import os
    import sys

    site = os.path.realpath(sys.argv[1])

    def inside(path):
        return os.path.realpath(path).startswith(site + os.sep)

    import trimkit
    import trimkit.adapters
    import trimkit.recipes

    for mod in (trimkit, trimkit.adapters, trimkit.recipes):
        assert inside(mod.__file__), f"{mod.__name__} came from {mod.__file__}, not the wheel"

    for name in ("trimkit.adapters.timm_vit", "trimkit.recipes.tome",
                 "trimkit.recipes.attn_prune"):
        mod = importlib.import_module(name)
        assert inside(mod.__file__), f"{name} came from {mod.__file__}, not the wheel"

    for bare in ("adapters", "recipes"):
        try:
            mod = importlib.import_module(bare)
        except ModuleNotFoundError:
            continue
        raise AssertionError(f"bare `import {bare}` works ({getattr(mod, '__file__', mod)}); "
                             f"only trimkit.{bare} may be installed")

    recipes = trimkit.list_recipes()
    for name in ("tome", "attn_prune"):
        assert name in recipes, f"recipe {name!r} missing from {recipes}"
    assert "timm-vit" in trimkit.list_adapters(), trimkit.list_adapters()
    print("wheel ok")
    """
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.update(kw.pop("env", {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode})\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--wheel-dir", str(dist), str(src)])
    wheels = sorted(dist.glob("trimkit-*.whl"))
    assert len(wheels) == 1, f"expected one trimkit wheel, got {wheels}"
    return wheels[0]


def test_wheel_holds_only_the_trimkit_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert "adapters" not in tops and "recipes" not in tops, sorted(tops)
    assert {t for t in tops if not t.endswith(".dist-info")} == {"trimkit"}, sorted(tops)
    # every module of the source tree ships, under trimkit/
    expected = [f"trimkit/{p.relative_to(ROOT / 'trimkit').as_posix()}"
                for p in (ROOT / "trimkit").rglob("*.py")]
    for folder in ("adapters", "recipes"):
        expected += [f"trimkit/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                     for p in (ROOT / folder).rglob("*.py")]
    for path in expected:
        assert path in names, f"{path} missing from the wheel"
    # the baseline `trimkit demo` starts from ships as package data
    assert "trimkit/benchmarks/data/easy_vqa_baseline.pt" in names
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    for entry in top_level:
        assert zipfile.ZipFile(wheel).read(entry).decode().split() == ["trimkit"]


def test_installed_wheel_imports_from_its_own_folder(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
          str(site), str(wheel)])
    assert not (site / "adapters").exists() and not (site / "recipes").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _run([sys.executable, "-c", CHECK, str(site)], cwd=elsewhere,
                env={"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert "wheel ok" in proc.stdout


def test_readme_commands_are_the_ones_ci_runs() -> None:
    """The README's two commands: install and run the demo, then the test command, which
    `.ci/run` runs as it is."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:]]
    assert blocks[0] == 'pip install -e ".[dev]" && trimkit demo'
    assert blocks[1] == "python -m pytest -q -n auto"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in ci and '"$py" -m pytest -q -n auto' in ci


def test_version_is_the_one_in_pyproject() -> None:
    """`trimkit.__version__` (from `trimkit/version.py`, which saved models record) is the
    version the distribution is built with, and the installed one's."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE)
    assert declared is not None, "pyproject.toml declares no static version"
    assert trimkit.__version__ is __version__
    assert __version__ == declared.group(1), (
        f"trimkit/version.py says {__version__}, pyproject.toml {declared.group(1)}")
    assert importlib.metadata.version("trimkit") == __version__


def test_the_docs_the_code_points_to_exist() -> None:
    """Messages and docstrings point users to files under ``docs/`` that the repository
    ships, never to a design document it does not (``DESIGN.md``)."""
    for folder in ("trimkit", "adapters", "recipes", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            assert "DESIGN.md" not in text, f"{path.relative_to(ROOT)} points to DESIGN.md"
            for match in re.finditer(r"docs/([\w-]+\.md)", text):
                assert (ROOT / "docs" / match.group(1)).is_file(), (
                    f"{path.relative_to(ROOT)} points to {match.group(0)}, which is not shipped")
