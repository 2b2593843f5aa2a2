"""Plugin discovery, the hook documentation rule, and broken plugins."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import types

import pytest

import handoff
from handoff import hookspecs, plugins
from handoff.backend import BackendSpec

HOOKS = [name for name in dir(hookspecs) if name.startswith("handoff_")]


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented_like_pytest(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith("."), f"{name}: needs a one-line summary"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"
    assert ":return" in doc, f"{name}: return value undocumented"
    assert "Example::" in doc, f"{name}: needs an example"
    opts = getattr(fn, "handoff_spec")
    if opts.get("firstresult"):
        assert "firstresult" in doc, f"{name}: must say it is firstresult"


def test_kitchen_sink_implements_every_hook():
    import kitchen_sink

    assert sorted(n for n in dir(kitchen_sink) if n.startswith("handoff_")) == sorted(HOOKS)


def test_kitchen_sink_hooks_are_called(sink_plugins):
    import kitchen_sink

    kitchen_sink.calls.clear()
    result = handoff.partition("sink:any", backends=["sink"], fallback=False, use_cache=False)
    assert set(kitchen_sink.calls) == set(HOOKS)
    assert result.report.notes == [f"kitchen sink saw {result.report.total_nodes} nodes"]
    assert "sink_net" in sink_plugins.zoo()


def test_builtin_tvm_is_registered_trylast_and_listed_last(sink_plugins):
    assert list(sink_plugins.backends)[-1] == "tvm"
    impl = next(i for i in sink_plugins.pm.hook.handoff_backends.get_hookimpls() if i.plugin_name == "tvm")
    assert impl.opts["trylast"]


def test_autoload_off_by_env(monkeypatch):
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    called = []
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: called.append(kw) or [])
    plugins.Plugins()
    assert called == []


def _fake_entry_points(monkeypatch, modules: dict[str, types.ModuleType | Exception]):
    eps = []
    for name, module in modules.items():
        modname = f"fake_handoff_{name}"
        if isinstance(module, types.ModuleType):
            monkeypatch.setitem(sys.modules, modname, module)
        eps.append(importlib.metadata.EntryPoint(name=name, value=modname, group=plugins.ENTRY_POINT_GROUP))
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [e for e in eps if e.group == group])


def _backend_module(bid: str) -> types.ModuleType:
    mod = types.ModuleType(f"fake_{bid}")

    @handoff.hookimpl
    def handoff_backends():
        return [BackendSpec(id=bid, version="1.0", compiler="kitchen_sink:SinkCompiler",
                            runtime="kitchen_sink:SinkRuntime", api_version=handoff.PLUGIN_API_VERSION)]

    mod.handoff_backends = handoff_backends
    return mod


def test_entry_point_discovery(monkeypatch):
    _fake_entry_points(monkeypatch, {"acme": _backend_module("acme")})
    pm = plugins.Plugins(autoload=True)
    assert list(pm.backends) == ["acme", "tvm"]
    assert pm.broken == []


def test_broken_plugin_is_reported_and_others_survive(monkeypatch):
    # "broken" names a module that does not exist: importing it fails.
    _fake_entry_points(monkeypatch, {"acme": _backend_module("acme"), "broken": ValueError()})
    pm = plugins.Plugins(autoload=True)
    assert "acme" in pm.backends and "tvm" in pm.backends
    assert [b.name for b in pm.broken] == ["broken"]
    assert str(pm.broken[0]).startswith("plugin 'broken' (entry point of unknown distribution) failed to load: "
                                        "ModuleNotFoundError: No module named 'fake_handoff_broken'")


def test_plugin_whose_hook_raises_is_reported(monkeypatch):
    mod = types.ModuleType("fake_raises")

    @handoff.hookimpl
    def handoff_backends():
        raise RuntimeError("SDK license expired")

    mod.handoff_backends = handoff_backends
    _fake_entry_points(monkeypatch, {"raises": mod, "acme": _backend_module("acme")})
    pm = plugins.Plugins(autoload=True)
    assert "acme" in pm.backends
    assert str(pm.broken[0]) == "plugin 'raises' (handoff_backends) failed to load: RuntimeError: SDK license expired"


def test_duplicate_backend_id_is_reported(monkeypatch):
    _fake_entry_points(monkeypatch, {"one": _backend_module("acme"), "two": _backend_module("acme")})
    pm = plugins.Plugins(autoload=True)
    assert list(pm.backends) == ["acme", "tvm"]
    assert "backend id 'acme' already provided by plugin" in str(pm.broken[0])


def test_plugins_env_registers_modules(monkeypatch):
    monkeypatch.setenv(plugins.PLUGINS_ENV, "kitchen_sink")
    pm = plugins.Plugins(autoload=False)
    assert {"sink", "sinkb"} <= set(pm.backends)


def test_unknown_backend_error_names_installed_and_hint(sink_plugins):
    with pytest.raises(handoff.HandoffError) as err:
        handoff.partition("sink:x", backends=["qnn"])
    assert str(err.value) == ("backend 'qnn' not installed; installed: sink, sinkb, tvm; "
                              "install with: pip install ./plugins/qnn")


def test_unknown_option_lists_valid_ones(sink_plugins):
    with pytest.raises(handoff.HandoffError) as err:
        handoff.partition("sink:x", backends=["sink"], options={"sink": {"speed": "11"}})
    assert str(err.value) == "backend 'sink' has no option 'speed'; valid options: crash_on, fail_on, fuse, max_nodes, ops, wrong_op"


def test_bad_option_value_is_one_line(sink_plugins):
    with pytest.raises(handoff.HandoffError) as err:
        handoff.partition("sink:x", backends=["sink"], options={"sink": {"ops": "aten.bogus.default"}})
    assert str(err.value).startswith("backend 'sink': ops ['aten.bogus.default'] unknown; valid:")


def test_runtime_import_does_not_load_torch_or_tvm():
    code = ("import sys, handoff.runtime, handoff; handoff.get_plugins().backends; "
            "bad = [m for m in ('torch', 'tvm', 'executorch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
