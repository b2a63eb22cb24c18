"""The import arrows of docs/architecture.md, checked on the source: a break fails here, not in
a user's install without the optional extra."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, rel: Path | None = None) -> set[str]:
    """Absolute names of every module `path` imports, relative imports resolved against the
    package the file is installed as (`strategies/x.py` is `adaptlab.strategies.x`); `rel`:
    where in the repository the file stands, if not at `path`."""
    rel = (rel or path.relative_to(ROOT)).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("strategies", "streams"):
        parts = ["adaptlab", *parts]
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def importing(folder: str, prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    """{file: [imports starting with one of `prefixes`]} over `folder`, only non-empty."""
    found = {}
    for path in sources(folder):
        hits = sorted(m for m in imported_modules(path)
                      if any(m == p or m.startswith(p + ".") for p in prefixes))
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    return found


def test_the_resolver_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    # the checks below are only as good as this parser: a file that imports a method both ways
    fake = tmp_path / "probe.py"
    fake.write_text("from .strategies import tame\nimport adaptlab.strategies.replay\n")
    found = imported_modules(fake, rel=Path("adaptlab/probe.py"))
    assert {"adaptlab.strategies", "adaptlab.strategies.replay"} <= found


def test_the_core_imports_no_method() -> None:
    found = importing("adaptlab", ("adaptlab.strategies", "strategies"))
    found.pop("adaptlab/cli.py", None)  # resolves the class paths configs name
    assert found == {}


def test_only_the_avalanche_bridge_imports_avalanche() -> None:
    found = {}
    for folder in ("adaptlab", "strategies", "streams"):
        found.update(importing(folder, ("avalanche",)))
    outside = {f: m for f, m in found.items() if not f.startswith("adaptlab/avalanche")}
    assert found, "the bridge should import avalanche"
    assert outside == {}


def test_streams_know_nothing_of_learners_or_the_core() -> None:
    core = tuple(f"adaptlab.{p.stem}" for p in sources("adaptlab") if p.stem != "__init__")
    assert importing("streams", ("adaptlab.strategies", "strategies", *core)) == {}


@pytest.mark.parametrize("folder", ["adaptlab", "strategies", "streams", "tests", "tools"])
def test_private_lightning_calls_live_in_one_module(folder: str) -> None:
    """Names starting with `_` imported from Lightning: only the module that gathers them."""
    offenders = {}
    for path in sources(folder):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in ("pytorch_lightning", "lightning",
                                                      "lightning_fabric")):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private += ["(module)"] * any(p.startswith("_") for p in node.module.split("."))
                if private:
                    offenders.setdefault(str(path.relative_to(ROOT)), []).extend(private)
    offenders.pop("adaptlab/_lightning_private.py", None)
    assert offenders == {}
