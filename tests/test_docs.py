"""The documentation: every relative link of the README and the docs pages points at a file that exists, and
the MkDocs site builds with warnings as errors (where its packages, the `[docs]` extra, are installed)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md"] + sorted(p.relative_to(ROOT).as_posix()
                                                         for p in (ROOT / "docs").glob("*.md")))
def test_relative_links_point_at_files(page):
    path = ROOT / page
    targets = [t for t in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", t)]
    missing = [t for t in targets if not (path.parent / t).exists()]
    assert not missing, missing


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "apt-get update && apt-get install -y dataset-fashion-mnist && pip install -e \".[experiments]\" && " \
           "python -m experiments.depth_ablation" in text
    assert 'pip install -e ".[dev]" && pytest' in text and "mkdocs build --strict" in text


def test_the_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason='the [docs] extra: pip install -e ".[docs]"')
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    assert 'id="featmix.CutMixAt"' in api and 'id="featmix.CutMix"' in api  # rendered from the docstrings
    assert (tmp_path / "img" / "layers.png").is_file()
