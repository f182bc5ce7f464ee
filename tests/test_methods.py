"""The method registry, a method written outside the package, and the rule that a
method lives in one module: nothing outside it names it, imports it or branches on it."""

import ast
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedalora.aggregation import zero_pad_average
from fedalora.config import FedConfig
from fedalora.errors import ConfigError
from fedalora.methods import Method, Participant, method_class, register_method
from fedalora.methods import registered_methods as methods

from .ema_method import EmaBLoRA

ROOT = Path(__file__).resolve().parents[1]


def test_a_method_named_by_import_path_is_found_and_registered():
    assert method_class("tests.ema_method:EmaBLoRA") is EmaBLoRA
    assert methods()["ema-b"] is EmaBLoRA
    config = FedConfig.from_run_config(
        {"strategy": "tests.ema_method:EmaBLoRA", "ranks": "8,4,2", "ema-decay": 0.25}
    )
    assert isinstance(config.method, EmaBLoRA) and config.method.options.ema_decay == 0.25
    assert FedConfig.from_run_config(config.to_run_config()) == config
    with pytest.raises(ConfigError, match="run-config 'ema-decay': must be in \\[0, 1\\)"):
        FedConfig.from_run_config({"strategy": "tests.ema_method:EmaBLoRA", "ema-decay": 1.0})


def test_the_registry_refuses_a_second_method_of_the_same_name():
    with pytest.raises(
        ValueError,
        match=r"method name 'fedit' is taken by "
        "fedalora.methods.fedit.FedIT",
    ):

        @register_method
        class Impostor(Method):
            name = "fedit"
            paper = None

    with pytest.raises(TypeError, match="needs a class attribute 'name'"):
        register_method(type("Nameless", (Method,), {}))


def test_the_ema_rule_blends_the_padded_average_into_the_old_b():
    rng = np.random.default_rng(0)
    layers = {"l.q": (5, 7)}
    config = FedConfig.from_run_config(
        {"strategy": "tests.ema_method:EmaBLoRA", "ranks": "3,2", "ema-decay": 0.3}
    )
    method, clients = config.method, [Participant(0, 3, 10), Participant(1, 2, 30)]
    old = {"l.q.lora_B": rng.normal(size=(5, 3)).astype(np.float32)}
    updates = [{"l.q.lora_B": rng.normal(size=(5, c.rank)).astype(np.float32)} for c in clients]
    padded = [np.pad(u["l.q.lora_B"], ((0, 0), (0, 3 - u["l.q.lora_B"].shape[1]))) for u in updates]
    mean = 0.25 * padded[0] + 0.75 * padded[1]
    new = method.aggregate(old, updates, clients)["l.q.lora_B"]
    np.testing.assert_allclose(new, 0.3 * old["l.q.lora_B"] + 0.7 * mean, rtol=1e-6)
    assert np.array_equal(
        new,
        0.3 * old["l.q.lora_B"]
        + 0.7 * zero_pad_average(updates, [10, 30], 3, slots="all")["l.q.lora_B"],
    )
    assert method.download({"l.q.lora_B": new}, clients[1])["l.q.lora_B"].shape == (5, 2)
    assert method.upload_shapes(layers, 2, 1) == {"l.q.lora_B": (5, 2)}


#: String constants spelled like a method's name that do not name the method.
HOMONYMS = {
    ("fedalora/launch/deploy.py", "local"),  # the sub-command that deploys on loopback
    ("fedalora/privacy.py", "local"),  # dp-mode='local': local differential privacy
}


def _sources() -> dict[str, str]:
    """The project's Python sources outside tests and benchmarks, by relative path."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {
        f: (ROOT / f).read_text()
        for f in files
        if not f.startswith(("tests/", "benchmarks/")) and (ROOT / f).exists()
    }


def test_a_method_lives_in_its_module_alone():
    """Each built-in method's name is a string constant of its own module only (prose
    aside), and no code outside ``fedalora/methods`` compares a strategy name."""
    sources = _sources()
    constants = {
        path: {
            node.value
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        for path, text in sources.items()
    }
    for name, cls in methods(built_in=True).items():
        own = cls.__module__.replace(".", "/") + ".py"
        assert [
            path
            for path, values in constants.items()
            if path != own and name in values and (path, name) not in HOMONYMS
        ] == [], name
    branch = re.compile(
        r"""strategy\s*(==|!=|\bin\b)|==\s*["'](?:"""
        + "|".join(map(re.escape, methods(built_in=True)))
        + r""")["']"""
    )
    assert [
        f"{path}:{n}"
        for path, text in sources.items()
        for n, line in enumerate(text.splitlines(), 1)
        if not path.startswith("fedalora/methods/") and branch.search(line)
    ] == []


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_subclasses(direct)}}


def test_no_code_outside_methods_and_adapters_imports_or_tests_their_classes():
    """Outside ``fedalora/methods/`` and ``fedalora/adapters/``, no module imports a
    concrete method or adapter class (or a method's own module) and none asks
    ``isinstance`` of one: they meet the code through ``Method`` and ``ClientAdapter``."""
    from fedalora.adapters import ClientAdapter

    concrete = {c.__name__ for c in {*methods(built_in=True).values(), *_subclasses(ClientAdapter)}}
    method_modules = {cls.__module__ for cls in methods(built_in=True).values()}
    found = []
    for path, text in _sources().items():
        if path.startswith(("fedalora/methods/", "fedalora/adapters/")):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = {alias.name for alias in node.names}
                if names & concrete or any(module.endswith(m) for m in method_modules):
                    found.append(f"{path}:{node.lineno} imports {module} {sorted(names)}")
            elif isinstance(node, ast.Import):
                found += [f"{path}:{node.lineno}" for a in node.names if a.name in method_modules]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
            ):
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                named |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if named & concrete:
                    found.append(f"{path}:{node.lineno} asks isinstance of {sorted(named)}")
    assert len(concrete) > 12  # every built-in method and the three adapter layers
    assert found == []


def test_the_docs_show_the_method_the_suite_runs():
    page = (ROOT / "docs" / "write-a-method.md").read_text()
    section = page[page.index("# Write your own method") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert code == (ROOT / "tests" / "ema_method.py").read_text()
    assert len(code.splitlines()) < 60


@pytest.mark.parametrize("page", ["README.md", "docs/methods.md"])
def test_the_methods_table_has_one_row_per_built_in_method(page):
    rows = re.findall(r"^\| `([^`]+)` \|", (ROOT / page).read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(["strategy", *methods(built_in=True)])  # header too
