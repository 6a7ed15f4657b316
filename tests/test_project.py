"""Project files agree with each other."""

from __future__ import annotations

import re
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
