"""The package as users install it: a wheel with featmix only, an import that pulls in nothing heavier than torch."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_featmix_imports_no_timm_torchvision_or_matplotlib():
    code = ("import sys, featmix; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision', 'matplotlib', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow
def test_the_wheel_holds_featmix_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("featmix-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"featmix"}, top
    assert "featmix/py.typed" in names and "featmix/kernels/cpu.py" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: torch>=2.4"]
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    import featmix
    assert f"Version: {featmix.__version__}" in meta
