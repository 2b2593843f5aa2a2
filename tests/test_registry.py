"""registry.yaml against the plugins in this repository, and presets."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from handoff.errors import HandoffError
from handoff.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = Registry.load((ROOT / "registry.yaml").read_text())
PROJECTS = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]


def test_packaged_registry_is_the_root_one():
    assert Registry.load() == REGISTRY


@pytest.mark.parametrize("pyproject", PROJECTS, ids=lambda p: p.parent.name)
def test_every_entry_point_is_catalogued(pyproject):
    meta = tomllib.loads(pyproject.read_text())["project"]
    eps = meta.get("entry-points", {}).get("handoff.backends", {})
    assert eps, f"{pyproject}: registers nothing in handoff.backends"
    for name, target in eps.items():
        assert name in REGISTRY.backends, f"{name} missing from registry.yaml"
        entry = REGISTRY.backends[name]
        assert entry["distribution"] == meta["name"]
        assert entry["entry_point"] == name
        assert target.split(":")[0].startswith(entry["module"])
        if pyproject.parent != ROOT:
            assert entry["install"] == f"pip install ./plugins/{pyproject.parent.name}"


@pytest.mark.parametrize("pyproject", PROJECTS, ids=lambda p: p.parent.name)
def test_declared_spec_matches_catalog(pyproject):
    """The BackendSpec a plugin declares (when importable here) agrees with its catalog entry."""
    meta = tomllib.loads(pyproject.read_text())["project"]
    for name, target in meta["entry-points"]["handoff.backends"].items():
        try:
            module = importlib.import_module(target.split(":")[0])
        except ImportError:
            pytest.skip(f"{meta['name']} not installed")
        for spec in module.handoff_backends():
            entry = REGISTRY.backends[spec.id]
            assert spec.device == entry["device"]


def test_presets_name_known_backends_and_expand():
    assert REGISTRY.expand(["preset:android", "xnnpack", "tvm"]) == ["qnn", "xnnpack", "tvm"]
    assert REGISTRY.expand(["preset:linux-npu"]) == ["qnn", "vulkan", "xnnpack"]
    with pytest.raises(HandoffError, match="unknown preset 'x'"):
        REGISTRY.expand(["preset:x"])


GOOD = ("{distribution: d, device: cpu, platforms: [linux-x86_64], compiler: {name: c, version: '1'}, "
        "install: pip install d, description: ok}")


def test_malformed_entries_are_reported_and_skipped():
    reg = Registry.load(f"backends:\n  a: {{device: cpu}}\n  b: {GOOD}\n  c: [1, 2]\n"
                        f"presets:\n  p: [zz]\n  q: [b]\n  r: 7\n")
    assert list(reg.backends) == ["b"] and reg.presets == {"q": ["b"]}
    assert reg.problems == [
        "registry.yaml: backend 'a' lacks distribution, platforms, compiler, install, description; entry skipped",
        "registry.yaml: backend 'c': entry is list, not a mapping; entry skipped",
        "registry.yaml: preset 'p' names unknown backends zz; skipped",
        "registry.yaml: preset 'r' is not a list of backend ids; skipped",
    ]


def test_unparsable_registry_is_a_problem_not_an_error():
    reg = Registry.load("backends: [\n")
    assert reg.backends == {} and reg.problems[0].startswith("registry.yaml skipped: ")


def test_plugin_entry_replaces_the_files():
    entry = {"distribution": "handoff-acme", "device": "npu", "platforms": ["linux-aarch64"],
             "compiler": {"name": "acme-sdk", "version": "3.1"}, "install": "pip install handoff-acme",
             "description": "Acme"}
    reg = Registry.load(f"backends:\n  acme: {GOOD}\n", plugin_entries=[("acme", {"acme": entry}),
                                                                         ("bad", {"x": {"device": "tpu"}})])
    assert reg.backends["acme"] == entry and reg.sources["acme"] == "plugin 'acme'"
    assert reg.problems == ["plugin 'bad': backend 'x' lacks distribution, platforms, compiler, install, "
                            "description; entry skipped"]


def test_wheel_ships_the_registry(tmp_path):
    """A non-editable install must find registry.yaml: the wheel carries it (the symlink
    core/registry.yaml resolved to the root file's contents)."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("handoff-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("handoff/registry.yaml") == (ROOT / "registry.yaml").read_bytes()
