"""``handoff new-backend``: what it writes and what it refuses. (That the generated package
installs and passes its own tests and the conformance suite is tests/test_vendor_kit.py.)"""

from __future__ import annotations

import py_compile
import tomllib

import pytest

from handoff import PLUGIN_API_VERSION, HandoffError
from handoff.cli import main
from handoff.scaffold import FILES, create


def test_new_backend_writes_a_distribution(tmp_path, capsys):
    root = tmp_path / "handoff-acme_npu"
    assert main(["new-backend", "acme_npu", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"created {root}/ for backend 'acme_npu' (distribution handoff-acme-npu)" in out
    assert "next: cd" in out and "pytest" in out
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == sorted(t.format(package="handoff_acme_npu", name="acme_npu") for t in FILES)
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "handoff-acme-npu"
    assert project["project"]["entry-points"]["handoff.backends"] == {"acme_npu": "handoff_acme_npu.plugin"}
    assert "--handoff-backend acme_npu" in project["tool"]["pytest"]["ini_options"]["addopts"]
    for path in root.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)
    plugin = (root / "handoff_acme_npu" / "plugin.py").read_text()
    assert 'api_version=PLUGIN_API_VERSION' in plugin and "import torch" not in plugin
    assert "class AcmeNpuCompiler(Compiler)" in (root / "handoff_acme_npu" / "compiler.py").read_text()
    assert "class AcmeNpuRuntime(Runtime)" in (root / "handoff_acme_npu" / "runtime.py").read_text()
    assert f"plugin API {PLUGIN_API_VERSION}" in (root / "README.md").read_text()


@pytest.mark.parametrize("name", ["Acme", "1acme", "acme-npu", "acme__npu", "acme_", ""])
def test_bad_names_say_what_is_valid(name, tmp_path):
    with pytest.raises(HandoffError, match="use lowercase letters, digits and single underscores"):
        create(name, tmp_path / "x")


def test_refuses_a_directory_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["new-backend", "acme", "--dir", str(tmp_path)]) == 1
    assert "exists and is not an empty directory; choose another with --dir" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
