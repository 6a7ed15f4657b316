"""Project files agree with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
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
