"""The plugin contract (plugin API 2.0): base classes and their defaults, typed options, hook
validation, API versions, the lowering cache's content key and plugin code identity,
check_partition, shared segments, and which host ops a program may hold."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import handoff
from handoff import BackendSpec, Compiler, HandoffError, Option, Runtime, hookimpl, plugins

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, fn)
    return mod


def _spec(bid: str = "acme", **kw) -> BackendSpec:
    fields = dict(id=bid, version="1.0", compiler="kitchen_sink:SinkCompiler", runtime="kitchen_sink:SinkRuntime",
                  api_version=handoff.PLUGIN_API_VERSION)
    fields.update(kw)
    return BackendSpec(**fields)


# -- hooks and API versions -------------------------------------------------------------------

def test_misspelled_hook_is_a_broken_plugin_naming_it(monkeypatch):
    @hookimpl
    def handoff_backend():  # sic: the hook is handoff_backends
        return [_spec()]

    monkeypatch.setitem(sys.modules, "acme_typo", _module("acme_typo", handoff_backend=handoff_backend))
    monkeypatch.setenv(plugins.PLUGINS_ENV, "acme_typo")
    pm = plugins.Plugins(autoload=False)
    assert "acme" not in pm.backends
    assert [str(b) for b in pm.broken] == [
        "plugin 'acme_typo' ($HANDOFF_PLUGINS) failed to load: implements unknown hook(s) 'handoff_backend' "
        "(did you mean 'handoff_backends'?); handoff's hooks are handoff_backends, handoff_catalog, "
        "handoff_zoo_models, handoff_resolve_model, handoff_report (see handoff.hookspecs)"]
    with pytest.raises(HandoffError, match="backend 'acme' not installed; installed: tvm"):
        pm.spec("acme")


def test_register_refuses_unknown_hooks():
    @hookimpl
    def handoff_zoo():
        return {}

    with pytest.raises(HandoffError, match=r"unknown hook\(s\) 'handoff_zoo' \(did you mean 'handoff_zoo_models'\?\)"):
        plugins.Plugins(autoload=False).register(_module("z", handoff_zoo=handoff_zoo))


@pytest.mark.parametrize("declared, why", [
    ("", "its BackendSpec declares no api_version; this handoff implements plugin API 2.0"),
    ("1.0", "built for plugin API 1.0; this handoff implements 2.0: upgrade the plugin"),
    ("2.9", "built for plugin API 2.9; this handoff implements 2.0: upgrade handoff"),
    ("two", "api_version 'two' is not a version like '2.0'"),
])
def test_incompatible_api_version_is_listed_as_broken(monkeypatch, declared, why):
    @hookimpl
    def handoff_backends():
        return [_spec(api_version=declared)]

    monkeypatch.setitem(sys.modules, "acme_api", _module("acme_api", handoff_backends=handoff_backends))
    pm = plugins.Plugins(autoload=False, extra=["acme_api"])
    assert "acme" not in pm.backends
    (broken,) = pm.broken
    assert broken.name == "acme_api" and broken.error.startswith(f"backend 'acme': {why}")
    with pytest.raises(HandoffError, match=r"backend 'acme' not installed; .*plugin 'acme_api' \(handoff_backends\)"):
        pm.spec("acme")


def test_halves_must_derive_from_the_base_classes(sink_plugins):
    class Loose:  # duck-typed, as plugin API 1 allowed
        def __init__(self, options):
            pass

    sys.modules["kitchen_sink"].Loose = Loose

    @hookimpl
    def handoff_backends():
        return [_spec("loose", compiler="kitchen_sink:Loose", runtime="kitchen_sink:Loose")]

    sink_plugins.register(_module("loose_plugin", handoff_backends=handoff_backends))
    with pytest.raises(HandoffError, match=r"backend 'loose': its compiler kitchen_sink:Loose is not a subclass of "
                                           r"handoff.Compiler \(plugin API 2.0\); derive it from handoff.Compiler"):
        sink_plugins.compiler("loose")
    ok, why = sink_plugins.runtime_available("loose")
    assert not ok and "is not a subclass of handoff.Runtime" in why


def test_base_class_defaults():
    compiler = Compiler({"a": 1})
    assert compiler.options == {"a": 1}
    assert (tuple(compiler.ops_to_not_decompose()), tuple(compiler.fused_patterns(None)),
            dict(compiler.check_partition(None, ["n"])), compiler.cache_key(), compiler.quantizer("int8")) == ((), (), {}, "", None)
    with pytest.raises(NotImplementedError, match="Compiler does not implement support"):
        compiler.support(None)
    runtime = Runtime()
    assert runtime.is_available() == (True, "") and runtime.memory(None) == handoff.HOST_MEMORY
    assert runtime.stats(None) == {} and runtime.release(None) is None and runtime.reentrant is False
    assert runtime.fresh_outputs is False
    arr = np.arange(3, dtype=np.float32)
    (back,) = runtime.to_host([arr])
    assert np.shares_memory(back, arr)


MINIMAL = '''
"""A plugin with only what plugin API 2.0 requires: support, preprocess, load, execute."""
import numpy as np
from handoff import PLUGIN_API_VERSION, BackendSpec, Compiler, Lowered, Runtime, hookimpl

class NegCompiler(Compiler):
    def support(self, ep):
        return {n.name: None if str(n.target) == "aten.neg.default" else "neg only"
                for n in ep.graph.nodes if n.op == "call_function"}

    def preprocess(self, ep, name):
        return Lowered(b"NEG" + __BLOB__, {})

class NegRuntime(Runtime):
    def load(self, blob, metadata, options):
        return bytes(blob)

    def execute(self, handle, inputs):
        return [-inputs[0]]

@hookimpl
def handoff_backends():
    return [BackendSpec(id="neg", version="1", compiler="{MODULE}:NegCompiler", runtime="{MODULE}:NegRuntime",
                        api_version=PLUGIN_API_VERSION)]
'''


def _minimal_plugin(tmp_path, monkeypatch, module: str, version: bytes = b"1") -> Path:
    path = tmp_path / f"{module}.py"
    path.write_text(MINIMAL.replace("{MODULE}", module).replace("__BLOB__", repr(version)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.PLUGINS_ENV, module)
    plugins.set_plugins(None)
    return path


class Neg(torch.nn.Module):
    def forward(self, x):
        return -torch.sin(x)


def test_minimal_plugin_runs_end_to_end_on_the_defaults(tmp_path, monkeypatch):
    _minimal_plugin(tmp_path, monkeypatch, "neg_plugin_a")
    x = torch.randn(3, 4)
    result = handoff.partition(Neg(), (x,), backends=["neg"], fallback=False,
                               default_limits=handoff.Limits(min_size=1))
    assert result.report.stats["neg"].partitions == 1
    with handoff.load(result.to_bytes()) as program:
        np.testing.assert_allclose(program.run([x])[0], -torch.sin(x).numpy(), rtol=1e-6)


# -- typed options ------------------------------------------------------------------------------

@pytest.mark.parametrize("option, raw, want", [
    (Option("int", min=1, max=8, aliases=("auto",)), "4", 4),
    (Option("int", default=None, min=1, aliases=("auto",)), "auto", None),
    (Option("float", min=0.0), "0.5", 0.5),
    (Option("bool"), "off", False),
    (Option("bool"), True, True),
    (Option("choice", choices=("fp32", "fp16")), "FP16", "fp16"),
    (Option("str", default="x"), None, "x"),
])
def test_options_parse_to_their_type(option, raw, want):
    assert option.parse("o", raw) == want


@pytest.mark.parametrize("option, raw, message", [
    (Option("int", min=1, max=256, aliases=("auto",)), "5000",
     "option o='5000' is not valid; valid values: an integer >= 1 and <= 256, or 'auto'"),
    (Option("int", min=0), "1.5", "option o='1.5' is not valid; valid values: an integer >= 0"),
    (Option("float"), "nan", "option o='nan' is not valid; valid values: a number"),
    (Option("bool"), "maybe", "option o='maybe' is not valid; valid values: 1, 0 (or true/false, yes/no, on/off)"),
    (Option("choice", choices=("a", "b")), "c", "option o='c' is not valid; valid values: a, b"),
])
def test_bad_option_values_name_the_valid_ones(option, raw, message):
    with pytest.raises(ValueError) as err:
        option.parse("o", raw)
    assert str(err.value) == message


def test_options_reach_the_compiler_parsed_with_defaults(sink_plugins):
    compiler = sink_plugins.compiler("sink", {"fuse": "yes", "max_nodes": "3"})
    assert compiler.options == {"ops": "aten.add.Tensor,aten.mul.Tensor,aten.relu.default", "fail_on": None,
                                "crash_on": None, "fuse": True, "max_nodes": 3, "wrong_op": None}
    with pytest.raises(HandoffError, match=r"^backend 'sink': option max_nodes='0' is not valid; valid values: "
                                           r"an integer >= 1$"):
        sink_plugins.compiler("sink", {"max_nodes": "0"})


def test_runtime_option_caps_are_enforced_at_load(sink_plugins):
    with pytest.raises(HandoffError, match="backend 'sink': option check='2' is not valid"):
        sink_plugins.parse_options("sink", {"check": "2"}, runtime=True)


def test_a_runtime_reads_metadata_and_options_it_cannot_change(sink_plugins, monkeypatch):
    """``Runtime.load`` gets the manifest's read-only metadata and read-only parsed options
    (docs/plugins.md): both are shared by later loads of the unchanged file."""
    import kitchen_sink

    real, refused = kitchen_sink.SinkRuntime.load, []

    def load(self, blob, metadata, options):
        for mapping, key in ((metadata, "ops"), (options, "check")):
            with pytest.raises(TypeError):
                mapping[key] = 0
            refused.append(key)
        return real(self, blob, metadata, options)

    monkeypatch.setattr(kitchen_sink.SinkRuntime, "load", load)
    result = handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False)
    with handoff.load(result.to_bytes()) as program:
        assert refused[:2] == ["ops", "check"] and program.run([np.ones((2, 8), np.float32)])[0].shape == (2, 8)


@pytest.mark.parametrize("fresh", [True, False])
def test_fresh_outputs_reach_the_caller_as_they_are(sink_plugins, monkeypatch, fresh):
    """A runtime that declares ``fresh_outputs`` (the kitchen sink's copy an input they hand back)
    has its numpy outputs returned by ``Program.run`` without a copy; one that does not has each
    small output copied; a fresh output that is not writable is copied all the same."""
    import kitchen_sink

    monkeypatch.setattr(kitchen_sink.SinkRuntime, "fresh_outputs", fresh)
    real, made = kitchen_sink.SinkRuntime.execute, []
    monkeypatch.setattr(kitchen_sink.SinkRuntime, "execute",
                        lambda self, handle, inputs: made.append(real(self, handle, inputs)) or made[-1])
    result = handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False)
    x = np.ones((2, 8), np.float32)
    with handoff.load(result.to_bytes()) as program:
        (out,) = program.run([x])
        assert (out is made[-1][-1]) is fresh and out.flags.writeable
        assert fresh or not np.shares_memory(out, made[-1][-1])
        monkeypatch.setattr(kitchen_sink.SinkRuntime, "execute", lambda self, handle, inputs: [
            np.frombuffer(o.tobytes(), np.float32).reshape(o.shape) for o in real(self, handle, inputs)])  # read-only
        (again,) = program.run([x])
        assert again.flags.writeable and np.array_equal(again, out)


# -- the lowering cache ----------------------------------------------------------------------------

def test_cache_is_looked_up_before_anything_is_exported(sink_plugins, monkeypatch):
    import kitchen_sink

    from handoff import lower

    model, x = kitchen_sink.sink_net(), torch.randn(2, 8)
    first = handoff.partition(model, (x,), backends=["sink"], fallback=False)
    assert first.report.stats["sink"].cached_partitions < first.report.stats["sink"].partitions
    exported = []
    real = lower.extract_partition
    monkeypatch.setattr(lower, "extract_partition", lambda *a, **k: exported.append(a[1]) or real(*a, **k))
    second = handoff.partition(model, (x,), backends=["sink"], fallback=False)
    s = second.report.stats["sink"]
    assert exported == [] and s.cached_partitions == s.partitions > 0
    assert s.compile_seconds == pytest.approx(first.report.stats["sink"].compile_seconds)
    assert second.to_bytes() == first.to_bytes()
    other_weights = kitchen_sink.sink_net()
    with torch.no_grad():
        other_weights.w.add_(1.0)
    third = handoff.partition(other_weights, (x,), backends=["sink"], fallback=False)
    assert third.report.stats["sink"].cached_partitions < s.partitions and exported


def test_edited_plugin_code_misses_the_cache(tmp_path, monkeypatch):
    """A plugin whose code changed but whose version did not must not get its old blobs."""
    path = _minimal_plugin(tmp_path, monkeypatch, "neg_plugin_b", version=b"1")
    x = torch.randn(3, 4)

    def blob() -> tuple[bytes, int]:
        result = handoff.partition(Neg(), (x,), backends=["neg"], fallback=False,
                               default_limits=handoff.Limits(min_size=1))
        return result.assembled.segments[0], result.report.stats["neg"].cached_partitions

    assert blob() == (b"NEG1", 0)
    assert blob() == (b"NEG1", 1)
    path.write_text(MINIMAL.replace("{MODULE}", "neg_plugin_b").replace("__BLOB__", repr(b"2")))
    sys.modules.pop("neg_plugin_b")
    plugins._package_digest.cache_clear()
    plugins.set_plugins(None)
    assert blob() == (b"NEG2", 0)


# -- check_partition ------------------------------------------------------------------------------

def test_check_partition_shrinks_a_partition_with_reasons(sink_plugins):
    import kitchen_sink

    model, x = kitchen_sink.sink_net(), torch.randn(2, 8)
    whole = handoff.partition(model, (x,), backends=["sink"], fallback=False, use_cache=False)
    assert whole.report.stats["sink"].nodes > 2
    result = handoff.partition(model, (x,), backends=["sink", "sinkb"], fallback=False, use_cache=False,
                               options={"sink": {"max_nodes": "2"}})
    report = result.report.to_json()
    moved = [d for d in report["declined"] if d["reasons"].get("sink") == "sink compiles at most 2 nodes together"]
    assert moved and all(d["ran_on"] in ("sink", "sinkb") for d in moved)
    with handoff.load(result.to_bytes()) as program:
        np.testing.assert_allclose(program.run([x])[0], model(x).detach().numpy(), rtol=1e-6, atol=1e-6)



# -- work carried from support to preprocess ---------------------------------------------------------

def test_preprocess_reuses_what_support_did_only_for_the_whole_program(sink_plugins):
    """The kitchen sink translates the program in ``support`` when it takes every node, and
    ``preprocess`` returns that translation for a partition that is the whole program
    (``handoff.partition_source``); a partition of part of the program is translated afresh."""
    import kitchen_sink

    model, x = kitchen_sink.sink_net(), torch.randn(2, 8)
    everything = {"ops": "aten.add.Tensor,aten.mul.Tensor,aten.relu.default,aten.sin.default"}
    kitchen_sink.reused.clear()
    whole = handoff.partition(model, (x,), backends=["sink"], fallback=False, use_cache=False,
                              options={"sink": everything})
    assert len(kitchen_sink.reused) == 1 == whole.report.stats["sink"].partitions
    kitchen_sink.reused.clear()
    split = handoff.partition(model, (x,), backends=["sink"], use_cache=False, default_limits=handoff.Limits(1))
    assert kitchen_sink.reused == [] and split.report.stats["sink"].partitions == 2  # sin runs on the host
    for result in (whole, split):
        with handoff.load(result.to_bytes()) as program:
            np.testing.assert_allclose(program.run([x])[0], model(x).detach().numpy(), rtol=1e-6, atol=1e-6)


class _TwoInputs(torch.nn.Module):
    """``x * w`` and ``relu(y + 1)``; ``case`` changes what makes a cut of every node differ from
    the program itself."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.w = torch.nn.Parameter(torch.randn(4))
        if case == "unused-weight":
            self.spare = torch.nn.Parameter(torch.randn(4))
        if case == "mutates-a-buffer":
            self.register_buffer("count", torch.zeros(4))

    def forward(self, x, y):
        if self.case == "inputs-reordered":  # y is read first: the cut takes its inputs in that order
            return torch.relu(y + 1) * self.w, x + 1
        a, b = x * self.w, torch.relu(y + 1)
        if self.case == "mutates-a-buffer":
            self.count.add_(1)
        return (b, a) if self.case == "outputs-reordered" else (a, b)


@pytest.mark.parametrize("case, whole", [("same", True), ("unused-weight", True), ("inputs-reordered", False),
                                         ("outputs-reordered", False), ("mutates-a-buffer", False)])
def test_partition_source_says_when_a_cut_is_the_whole_program(case, whole):
    from handoff.lower import extract_partition

    ep = torch.export.export(_TwoInputs(case).eval(), (torch.randn(4), torch.randn(4))).run_decompositions({})
    names = [n.name for n in ep.graph.nodes if n.op == "call_function"]
    assert handoff.partition_source(ep) is None
    sub, _, _ = extract_partition(ep, names)
    source = handoff.partition_source(sub)
    assert source.program is ep and source.nodes == tuple(names) and source.whole is whole
    assert [n.name for n in sub.graph.nodes if n.op == "call_function"] == names
    again, _, _ = extract_partition(ep, names)  # a cut is deterministic: another cut is the same program
    assert str(again.graph) == str(sub.graph) and again.graph_signature == sub.graph_signature
    part, _, _ = extract_partition(ep, names[:1])
    assert handoff.partition_source(part).whole is False
    # decomposed further, the cut is no longer the program's nodes: nothing to reuse
    decomposed, _, _ = extract_partition(ep, names, {torch.ops.aten.relu.default: lambda t: torch.clamp(t, min=0)})
    assert handoff.partition_source(decomposed) is None


def _combination_check(bad: set[frozenset[str]], calls: list[list[str]]):
    """A "compiler" that fails on any group holding all nodes of one of ``bad``, naming them."""

    def check(names: list[str]) -> str | None:
        calls.append(list(names))
        hit = [sorted(b) for b in bad if b <= set(names)]
        return f"fails with {min(hit)}" if hit else None

    return check


def test_first_failing_finds_the_node_that_breaks_a_group():
    nodes = [f"n{i}" for i in range(64)]
    calls: list[list[str]] = []
    assert list(handoff.first_failing(_combination_check(set(), calls), nodes)) == [] and calls == [nodes]
    calls.clear()
    found = list(handoff.first_failing(_combination_check({frozenset({"n3", "n40"})}, calls), nodes))
    assert found == [("n40", "fails with ['n3', 'n40']", False)]
    assert len(calls) <= 1 + 6 + 1  # the whole group, log2(64) prefixes, the rest
    assert calls[-1] == [n for n in nodes if n != "n40"]  # the last check is the rest's
    calls.clear()
    found = list(handoff.first_failing(_combination_check({frozenset({"n0"}), frozenset({"n5"})}, calls), nodes[:8]))
    assert found == [("n0", "fails with ['n0']", True), ("n5", "fails with ['n5']", False)]  # n1..n4 pass
    calls.clear()
    everything = {frozenset({n}) for n in nodes[:3]}
    assert [n for n, _, _ in handoff.first_failing(_combination_check(everything, calls), nodes[:3])] == nodes[:3]
    assert all(calls)  # never asked about an empty group


def test_first_failing_resumes_where_the_last_culprit_was_found():
    """Many culprits close together (a select every 7 nodes of a GRU): each round searches past
    the prefix that already passed instead of bisecting the whole rest again."""
    nodes = [f"n{i}" for i in range(683)]
    calls: list[list[str]] = []
    bad = {frozenset({f"n{i}"}) for i in range(3, 683, 7)}
    found = list(handoff.first_failing(_combination_check(bad, calls), nodes))
    assert [n for n, _, _ in found] == [f"n{i}" for i in range(3, 683, 7)]
    assert len(calls) < 7 * len(found)  # bisecting the whole rest every round: over 10 a culprit


def test_first_failing_never_cuts_a_quantize_from_its_dequantize():
    """A QDQ chain where the compiler refuses a cut between a quantize and its dequantize (an
    integer tensor crossing it, as the QNN EP does) and fails on op3. Unconstrained, bisection
    blames the first quantize it cuts through; with ``together`` it finds op3, and a quantize
    found at fault takes its dequantize users with it."""
    nodes = [n for i in range(6) for n in (f"q{i}", f"dq{i}", f"op{i + 1}")]
    users = {f"q{i}": [f"dq{i}"] for i in range(6)}

    def check(bad):
        def run(names):
            calls.append(list(names))
            cut = [q for q, dqs in users.items() if q in names and not set(dqs) <= set(names)]
            if cut:
                return f"{cut[0]} hands an integer tensor across the cut"
            return f"{bad} fails" if bad in names else None
        return run

    calls: list[list[str]] = []
    wrong = next(handoff.first_failing(check("op3"), nodes))
    assert wrong[0].startswith("q") and "across the cut" in wrong[1]  # the pathology: a quantize blamed
    calls.clear()
    found = list(handoff.first_failing(check("op3"), nodes, users))
    assert found == [("op3", "op3 fails", False)]
    assert all(set(users[q]) <= set(c) for c in calls for q in c if q in users)  # never cut
    assert len(calls) <= 1 + 5 + 1
    found = list(handoff.first_failing(check("q2"), nodes, users))
    assert found == [("q2", "q2 fails", False), ("dq2", "q2 fails", False)]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 24).flatmap(lambda n: st.tuples(
    st.just(n), st.sets(st.frozensets(st.integers(0, n - 1), min_size=1, max_size=3), max_size=4))))
def test_first_failing_matches_a_linear_scan(case):
    """Against the obvious algorithm: take out the last node of the shortest failing prefix
    (checking prefixes one by one) until the rest passes."""
    n, bad_ints = case
    nodes = [f"n{i}" for i in range(n)]
    bad = {frozenset(f"n{i}" for i in b) for b in bad_ints}
    check = _combination_check(bad, [])
    expected, remaining = [], list(nodes)
    while check(remaining) is not None:
        k = next(k for k in range(1, len(remaining) + 1) if check(remaining[:k]) is not None)
        expected.append((remaining[k - 1], check(remaining[:k]), k == 1))
        remaining.pop(k - 1)
    assert list(handoff.first_failing(check, nodes)) == expected

# -- the program file ------------------------------------------------------------------------------

class Twice(torch.nn.Module):
    """The same weighted block twice around a host op: two identical delegate blobs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        y = torch.relu(x * self.w + 1.0)
        return torch.relu(torch.sin(y) * self.w + 1.0)


def test_identical_segments_are_stored_once(sink_plugins):
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(2, 8)
    result = handoff.partition(model, (x,), backends=["sink"], fallback=False)
    m = result.assembled.manifest
    assert len(m["delegates"]) == 2 and m["delegates"][0]["segment"] == m["delegates"][1]["segment"]
    assert len(result.assembled.segments) == 1
    with handoff.load(result.to_bytes()) as program:
        np.testing.assert_allclose(program.run([x])[0], model(x).detach().numpy(), rtol=1e-6, atol=1e-6)


class Bessel(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x) + 1.0


def test_partition_refuses_host_ops_the_runtime_will_not_run(sink_plugins):
    with pytest.raises(HandoffError) as err:
        handoff.partition(Bessel(), (torch.randn(4),), backends=["sink"], fallback=False)
    assert str(err.value) == (
        "node special_bessel_j0 (aten.special_bessel_j0.default) would run on the host, but host op "
        "'aten.special_bessel_j0.default' is not on the runtime's allow-list of pure ops (handoff.hostops.HOST_OPS); "
        "every backend declined it (sink: sink has no kernel for aten.special_bessel_j0.default); "
        "select a backend that takes it")


import torch.ao.quantization.fx._decomposed  # noqa: E402,F401  -- registers quantized_decomposed ops


class QuantRoundTrip(torch.nn.Module):
    def forward(self, x):
        q = torch.ops.quantized_decomposed.quantize_per_tensor(x, 0.05, 3, -128, 127, torch.int8)
        return torch.ops.quantized_decomposed.dequantize_per_tensor(q, 0.05, 3, -128, 127, torch.int8) * 2.0


def test_quantized_decomposed_host_ops_load_and_run(sink_plugins):
    x = torch.randn(2, 8)
    result = handoff.partition(QuantRoundTrip(), (x,), backends=["sink"], fallback=False)
    targets = {i["target"] for i in result.assembled.manifest["instructions"] if i["op"] == "aten"}
    assert "quantized_decomposed.quantize_per_tensor.default" in targets
    with handoff.load(result.to_bytes()) as program:
        np.testing.assert_array_equal(program.run([x])[0], QuantRoundTrip()(x).numpy())


class Filled(torch.nn.Module):
    def forward(self, x):
        return torch.mul(x, torch.full((2, 8), 3.0))


def test_host_op_arguments_must_match_the_declared_outputs(sink_plugins, tmp_path):
    """A crafted size argument cannot make the host allocate more than the file declares."""
    from handoff.program import ProgramFile, program_bytes

    # unfolded, so that the full stays a host op (folded, it is a constant of the file)
    result = handoff.partition(Filled(), (torch.randn(2, 8),), backends=["sink"], fallback=False, fold=False)
    manifest = dict(result.assembled.manifest)
    (full,) = [i for i in manifest["instructions"] if i.get("target") == "aten.full.default"]
    full["args"][0] = [1 << 20, 1 << 20]
    data = program_bytes(manifest, result.assembled.segments)
    with pytest.raises(HandoffError) as err:
        handoff.load(data)
    assert "is refused: output 0 would be float32[1048576, 1048576], the manifest declares float32[2, 8]" in str(err.value)
    with ProgramFile.from_bytes(data):
        pass  # the file itself is well formed: only the runtime's check refuses it


# -- import hygiene --------------------------------------------------------------------------------

def test_load_and_run_read_no_catalogue(sink_plugins, tmp_path):
    import kitchen_sink

    result = handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False,
                               options={"sink": {"ops": "aten.mul.Tensor,aten.add.Tensor,aten.relu.default,"
                                                        "aten.sin.default"}})
    assert not [i for i in result.assembled.manifest["instructions"] if i["op"] == "aten"]
    path = tmp_path / "m.hof"
    result.write(str(path))
    code = textwrap.dedent(f"""
        import sys, numpy as np, handoff
        with handoff.load({str(path)!r}) as p:
            p.run([np.ones((2, 8), np.float32)])
        bad = [m for m in ("yaml", "torch", "tvm") if m in sys.modules]
        assert not bad, bad
    """)
    env = {"HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1", "HANDOFF_PLUGINS": "kitchen_sink",
           "PYTHONPATH": str(ROOT / "tests" / "plugins"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


PUBLIC_MODULES = {"handoff", "handoff.blob", "handoff.conformance", "handoff.testing", "handoff.tvm"}


#: Plugin test suites checked too (they use handoff.testing's fixtures, not handoff.plugins).
CHECKED_TESTS = ["plugins/xnnpack/tests", "plugins/vulkan/tests", "plugins/coreml/tests", "plugins/qnn/tests"]
#: Tests of a core feature that run it with a real plugin, not of the plugin: they use its internals.
CORE_FEATURE_TESTS = {"plugins/xnnpack/tests/test_compare_strategies.py",  # handoff.compare, handoff.strategies
                      "plugins/xnnpack/tests/test_reload.py"}  # handoff.verified


@pytest.mark.parametrize("package", sorted([*ROOT.glob("plugins/*/handoff_*"), *ROOT.glob("plugins/*/tools"),
                                            *(ROOT / d for d in CHECKED_TESTS)]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plugins_use_only_the_public_api(package):
    """A plugin (its package, tools and tests) imports from handoff only what docs/plugins.md
    documents: the public modules, and from ``handoff`` itself only what ``handoff.__all__`` lists;
    nor does it reach past them as ``handoff.NAME`` (``handoff.plugins.set_plugins``)."""
    public = set(handoff.__all__) | {m.split(".")[1] for m in PUBLIC_MODULES if "." in m}
    for path in package.rglob("*.py"):
        if str(path.relative_to(ROOT)) in CORE_FEATURE_TESTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "handoff":
                    for alias in node.names:
                        assert alias.name in public, f"{path.relative_to(ROOT)}:{node.lineno} imports handoff.{alias.name}"
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "handoff":
                assert node.attr in public, f"{path.relative_to(ROOT)}:{node.lineno} uses handoff.{node.attr}"
            for name in names:
                if name == "handoff" or name.startswith("handoff."):
                    assert name in PUBLIC_MODULES, f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
