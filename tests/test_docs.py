"""The docs a user clones are complete: generated pages are current, links resolve, and nothing
points outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_metrics_page_is_generated_from_the_definitions() -> None:
    out = subprocess.run([sys.executable, "tools/docs_metrics.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from adaptlab import metrics

    text = (ROOT / "docs" / "metrics.md").read_text()
    assert all(f"| `{name}` |" in text for name in metrics.DEFINITIONS)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert missing == []


def test_nothing_points_outside_the_repository() -> None:
    """`shared/` (design notes and specs) is not part of the repository a user clones."""
    pattern = re.compile(r"shared/|DESIGN\.md|specs/\w+\.md|spec `\w+\.md`")
    files = PAGES + [p for d in ("adaptlab", "strategies", "streams", "tools", "configs")
                     for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml", ".md", ".sh")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_every_method_has_a_page() -> None:
    from adaptlab import strategies

    pages = {p.stem for p in (ROOT / "docs" / "methods").glob("*.md")}
    learners = {"TAME": "tame", "StreamAdapter": "stream_adapter", "Finetune": "baselines",
                "Replay": "baselines", "Joint": "baselines",
                "EmbeddingForgetting": "forgetting"}
    assert {name for name, page in learners.items()
            if hasattr(strategies, name) and page not in pages} == set()
