"""Project files agree with each other."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # the test extra includes others by name ("offshelf[ray]"): their pins count, the self-reference does not
    included = [name for pin in extras["test"] if pin.startswith("offshelf[") for name in pin[9:-1].split(",")]
    pins = set(project["dependencies"]) | {p for p in extras["test"] if not p.startswith("offshelf[")}
    pins |= {p for name in included for p in extras[name]}
    conda = {m.group(1) for m in re.finditer(r"^\s+- ([A-Za-z0-9_.\-\[\]]+==\S+)\s*$", (ROOT / "environment.yml").read_text(), re.M)}
    assert conda == pins
    assert all("==" in pin for pin in project["dependencies"])


def test_readme_commands_are_the_make_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("benchmark", "test", "setup"):
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "make benchmark" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


PACKAGES = ("extract", "classify", "baselines", "transfer")


def _module_imports() -> dict[str, set[str]]:
    """Each offshelf module -> the offshelf modules it imports anywhere in its code (at the top or
    inside a function: a deferred import is still a dependency)."""
    modules = {}
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            parts = file.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file

    def module_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, file in modules.items():
        found = set()
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            found |= {m for m in map(module_of, names) if m}
        # a module's own packages run first whatever it imports: importing one is not a circle
        graph[name] = {m for m in found if m != name and not name.startswith(m + ".")}
    return graph


def test_no_module_imports_itself_round_a_circle():
    graph = _module_imports()
    assert {"extract.pipeline", "extract.store", "baselines.registry"} <= set(graph)  # the walk saw the code
    circles = []
    for start in graph:  # a depth-first walk from each module back to itself
        stack, seen = [(start, (start,))], set()
        while stack:
            module, path = stack.pop()
            for nxt in graph[module]:
                if nxt == start:
                    circles.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert not circles, circles


def test_the_pipeline_imports_no_command_line_ray_or_model():
    code = ("import sys, extract.pipeline, extract.commands\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'tensorflow', 'keras', 'torch') or m == 'extract.cli'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
