"""The layout's promises: the core needs no Flower (every module of ``fedalora``
imports in a Python where ``flwr`` cannot be imported), and installing the project adds
the design card's four top-level packages and nothing else."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED_IMPORT = """
import importlib, pkgutil, sys

class NoFlower:
    def find_spec(self, name, path=None, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, NoFlower())
import fedalora
failed = []
for module in pkgutil.walk_packages(fedalora.__path__, "fedalora."):
    try:
        importlib.import_module(module.name)
    except ImportError as exc:
        failed.append(f"{module.name}: {exc}")
print(len(list(pkgutil.walk_packages(fedalora.__path__, "fedalora."))), failed)
sys.exit(1 if failed else 0)
"""


def test_every_core_module_imports_without_flower():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split()[0]) > 30  # every module was visited, not none


def test_installation_adds_only_the_design_cards_top_level_packages():
    """``pip install .`` puts the four folders into site-packages and no generic
    top-level module (the message contract lives in ``strategies.protocol``)."""
    import tomllib

    from setuptools import find_packages

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools) == {"packages"}, "no py-modules: a module would install globally"
    packages = find_packages(ROOT, include=setuptools["packages"]["find"]["include"])
    assert {name.split(".")[0] for name in packages} == {
        "fedalora",
        "clients",
        "server",
        "strategies",
    }
    assert (ROOT / "strategies" / "protocol.py").is_file()
    assert not (ROOT / "protocol.py").exists()
