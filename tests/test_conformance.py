"""The conformance suite itself (``handoff.conformance``): its catalogue, and the pytest plugin run
against the kitchen sink and against a deliberately broken backend, in a child pytest each (the
plugin reads ``$HANDOFF_PLUGINS`` when pytest starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from handoff.conformance import cases as catalogue_module
from handoff.conformance.runner import compare, variant

ROOT = Path(__file__).resolve().parent.parent
ISSUE_CATEGORIES = {"elementwise", "activation", "conv", "pool", "norm", "linear", "reduction", "softmax", "shape",
                    "index", "embedding", "upsample", "pad", "attention", "rnn", "quantized", "block"}


def test_catalogue_has_the_cases_the_issue_lists():
    cases = catalogue_module.catalogue()
    assert len(cases) >= 120
    assert {c.category for c in cases} == ISSUE_CATEGORIES
    names = {c.name for c in cases}
    for wanted in ("conv1d", "conv2d", "conv_transpose2d", "batch_norm2d", "layer_norm", "linear", "matmul", "bmm",
                   "softmax", "cat", "split", "gather", "index_select", "embedding", "gru", "lstm",
                   "quantize_dequantize"):
        assert any(n == wanted or n.startswith(wanted) for n in names), wanted
    assert all(set(c.dtypes) <= set(catalogue_module.DTYPES) for c in cases)


@pytest.mark.parametrize("case", catalogue_module.catalogue(), ids=lambda c: c.name)
def test_case_is_not_degenerate(case):
    """Eager outputs are finite and change with the input (a backend that returns zeros, or skips
    the op, cannot pass), at fixed dimensions in the case's first dtype."""
    var = variant(case, case.dtypes[0], case.fixed_dims())
    a = var.expected(var.inputs(1)[1])
    b = var.expected(var.inputs(2)[1])
    assert a and all(np.isfinite(x).all() for x in a if x.dtype.kind == "f")
    assert any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, b)), "output ignores the input"


def test_compare_uses_the_tolerance_table():
    want = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    assert not compare(want + 5e-5, want, "float32")["bad"]
    bad = compare(want + 1e-3, want, "float32")
    assert bad["bad"] and "64 of 64 values out of tolerance (float32: 0.0001 relative)" in bad["message"]
    assert compare(want[:4], want, "float32")["shape"]
    assert compare(np.array([1, 2], np.int32), np.array([1, 3], np.int32), "int32")["bad"]


def _pytest(tmp_path: Path, *args: str, plugins: str = "kitchen_sink",
            extra_path: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HANDOFF_DISABLE_PLUGIN_AUTOLOAD"}
    env["HANDOFF_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only the test plugins: nothing installed leaks in
    env["HANDOFF_PLUGINS"] = plugins
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests" / "plugins"), extra_path) if p)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W", "ignore",
                           "--rootdir", str(tmp_path), "-c", os.devnull, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def test_plugin_is_inert_without_the_option(tmp_path):
    """The pytest11 entry point loads in every pytest run: without --handoff-backend it adds no
    item and imports neither the catalogue nor torch."""
    (tmp_path / "test_one.py").write_text("import sys\n\ndef test_x():\n"
                                          "    assert 'handoff.conformance.cases' not in sys.modules\n"
                                          "    assert 'torch' not in sys.modules\n")
    proc = _pytest(tmp_path, "test_one.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "handoff conformance" not in proc.stdout


BROKEN_PLUGIN = '''
"""A backend that breaks the contract: its plugin module imports torch, its runtime adds 1 to
every output and kills the process on an empty blob."""
import os
import signal

import torch  # noqa: F401  -- the imports check must catch this

import kitchen_sink
from handoff import PLUGIN_API_VERSION, BackendSpec, hookimpl


class BrokenRuntime(kitchen_sink.SinkRuntime):
    def load(self, blob, metadata, options):
        if len(blob) == 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().load(blob, metadata, options)

    def execute(self, handle, inputs):
        return [o + 1 for o in super().execute(handle, inputs)]


@hookimpl
def handoff_backends():
    return [BackendSpec(id="broken", version="0.1", compiler="kitchen_sink:SinkCompiler",
                        runtime="broken_plugin:BrokenRuntime", description="broken on purpose",
                        options=kitchen_sink.OPTIONS, runtime_options=kitchen_sink.RUNTIME_OPTIONS,
                        api_version=PLUGIN_API_VERSION)]
'''


@pytest.mark.slow
def test_suite_against_the_kitchen_sink_and_a_broken_backend(tmp_path):
    """One run of the suite: passes, declines, a broken promise, strict xfails, each failure cause,
    the contract checks, the JSON report and the summary table."""
    (tmp_path / "broken_plugin.py").write_text(BROKEN_PLUGIN)
    (tmp_path / "expect.yaml").write_text("backend: sink\nops:\n  - aten.add.Tensor\n  - aten.sin.default\n"
                                          "cases:\n  - relu\n")
    (tmp_path / "xfail.yaml").write_text(textwrap.dedent("""\
        backend: sink
        xfail:
          "contract[foreign-blob]": "the kitchen sink's blob has no version marker"
          "relu[float32-fixed]": "listed on purpose: it passes, so the suite reports it"
        """))
    report = tmp_path / "report.json"
    proc = _pytest(tmp_path, "--handoff-backend", "sink,broken", "--handoff-cases", "relu,sin,conv2d,zoo_*",
                   "--handoff-zoo", "sink_net", "--handoff-examples", "1", "--handoff-dtypes", "float32,float16",
                   "--handoff-expect", "expect.yaml", "--handoff-xfail", "xfail.yaml", "--handoff-report",
                   str(report), "--handoff-seed", "7", plugins="kitchen_sink,broken_plugin", extra_path=str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    data = json.loads(report.read_text())
    assert data["seed"] == 7 and set(data["backends"]) == {"sink", "broken"}
    sink = {c["item"]: c for c in data["backends"]["sink"]["cases"]}
    assert sink["relu[float32-drawn]"]["status"] == "passed"
    assert sink["relu[float32-fixed]"]["status"] == "xpassed"
    assert sink["conv2d[float32-fixed]"]["status"] == "declined"
    assert sink["sin[float32-fixed]"]["cause"] == "promised op declined"
    promise = sink["sin[float32-fixed]"]["message"]
    assert "aten.sin.default (promised in expect.yaml) declined: sink has no kernel" in promise
    assert sink["zoo_sink_net[float32-fixed]"]["cause"] == "promised op declined"  # it holds a sin
    # the kitchen sink computes float32 whatever the program declares: a claimed-then-wrong dtype
    assert sink["relu[float16-fixed]"]["cause"] == "wrong dtype/shape"
    passed = [o for o in sink["relu[float32-drawn]"]["outcomes"] if o["status"] == "passed"][0]
    assert passed["delegated_nodes"] == 1 and passed["blob_bytes"] > 0 and passed["max_abs_error"] == 0.0
    assert passed["delegated_ops"] == {"aten.relu.default": 1}
    contract = data["backends"]["sink"]["contract"]
    assert contract["foreign-blob"]["status"] == "xfailed"
    assert all(contract[c]["status"] == "passed" for c in ("spec", "imports", "corrupt-blob", "threads")), contract

    broken = data["backends"]["broken"]
    cases = {c["item"]: c for c in broken["cases"]}
    assert cases["relu[float32-fixed]"]["cause"] == "wrong result"
    assert "values out of tolerance" in cases["relu[float32-fixed]"]["message"]
    assert cases["conv2d[float32-fixed]"]["status"] == "declined"  # a rejection is data: it passes
    assert "importing broken_plugin imports kitchen_sink, torch" in broken["contract"]["imports"]["message"]
    assert "no catalogue entry: implement the handoff_catalog hook" in broken["contract"]["spec"]["message"]
    assert "killed by SIGSEGV" in broken["contract"]["corrupt-blob"]["message"]
    assert "carries no version marker" in broken["contract"]["foreign-blob"]["message"]
    assert "handoff conformance" in out, out
    assert "broken: wrong result" in out and "sink: xpassed x1: relu[float32-fixed]" in out


def test_usage_errors_name_the_fix(tmp_path):
    (tmp_path / "xfail.yaml").write_text("xfail:\n  'no_such_case[*]': 'gone'\n")
    proc = _pytest(tmp_path, "--handoff-backend", "nosuch")
    assert proc.returncode == 4
    assert "--handoff-backend: nosuch not installed; installed: " in proc.stderr
    assert "HANDOFF_DISABLE_PLUGIN_AUTOLOAD is set" in proc.stderr
    proc = _pytest(tmp_path, "--handoff-backend", "sink", "--handoff-xfail", "xfail.yaml")
    assert proc.returncode == 4 and "entries that match no item of the suite" in proc.stderr


@pytest.mark.slow
def test_compiler_half_is_imported_in_a_child_only_when_a_plugin_module_pulls_modules_in(tmp_path, monkeypatch):
    """The imports check learns what the compiler half imports (a fresh process importing torch and
    the vendor SDK) only when the plugin or runtime module imports something beyond handoff: the
    kitchen sink's pass on the probe child alone; the broken plugin module, which imports torch,
    still fails, naming it. Each child leaves its request file in the work folder."""
    import kitchen_sink

    from handoff import plugins
    from handoff.conformance.contract import Contract, ContractFailure
    from handoff.conformance.runner import Target

    (tmp_path / "broken_plugin.py").write_text(BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import broken_plugin

    pm = plugins.Plugins(autoload=False)
    pm.register(kitchen_sink, name="kitchen_sink")
    pm.register(broken_plugin, name="broken_plugin")
    plugins.set_plugins(pm)
    try:
        sink = Contract(Target("sink", pm), "kitchen_sink", ["kitchen_sink", "broken_plugin"], tmp_path)
        sink.check("imports")
        assert (tmp_path / "sink-probe.json").exists() and not (tmp_path / "sink-compiler.json").exists()
        broken = Contract(Target("broken", pm), "broken_plugin", ["kitchen_sink", "broken_plugin"], tmp_path)
        with pytest.raises(ContractFailure, match=r"^importing broken_plugin imports kitchen_sink, torch, "):
            broken.check("imports")
        assert (tmp_path / "broken-compiler.json").exists()
    finally:
        plugins.set_plugins(None)
        sys.modules.pop("broken_plugin", None)  # this test's file: no later test imports it
