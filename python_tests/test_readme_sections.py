"""The README section writer used by the demo and the benchmark reports."""

from __future__ import annotations

import pytest

from tools.readme_sections import markers, replace_section


def test_replaces_only_its_section(tmp_path):
    path = tmp_path / "README.md"
    a, b = markers("a"), markers("b")
    path.write_text(f"top\n{a[0]}\nold a\n{a[1]}\nmid\n{b[0]}\nold b\n{b[1]}\nend\n")
    replace_section(path, "a", "new a with \\1 and $0")
    text = path.read_text()
    assert "old a" not in text and "new a with \\1 and $0\n" in text
    assert "old b" in text and text.startswith("top\n") and text.endswith("end\n")


def test_missing_markers_name_them(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("no markers\n")
    with pytest.raises(SystemExit, match="<!-- demo:start -->"):
        replace_section(path, "demo", "x")
