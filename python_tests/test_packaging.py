"""Packaging: PEP 621 metadata with the version from dyrate_ext.__version__, one extra per
tier, the console script, py.typed, a stable-ABI extension, and a core that imports no tier."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import dyrate_ext


def test_metadata_version_and_extras():
    assert md.version("dyrate_ext") == dyrate_ext.__version__
    meta = md.metadata("dyrate_ext")
    assert meta["Requires-Python"] == ">=3.10"
    assert set(meta.get_all("Provides-Extra")) >= {"llava", "demo", "train", "eval", "dev"}
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch>=2.13") and "extra" not in r for r in requires)
    assert any(r.startswith("transformers") and 'extra == "llava"' in r for r in requires)


def test_console_script_and_py_typed():
    scripts = {e.name: e.value for e in md.entry_points(group="console_scripts")}
    assert scripts.get("dyrate-demo") == "dyrate_ext.demo.cli:main"
    assert (Path(dyrate_ext.__file__).parent / "py.typed").is_file()


def test_extension_uses_the_stable_abi():
    import dyrate_ext._C as ext

    assert ext.__file__.endswith(".abi3.so"), ext.__file__


def test_core_imports_no_tier():
    code = (
        "import sys, dyrate_ext; "
        "bad = [m for m in ('transformers', 'PIL', 'matplotlib', 'dyrate_ext.llava') "
        "if m in sys.modules]; print(bad); raise SystemExit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
