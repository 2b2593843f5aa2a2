"""partition(): priority order, report contents, lowering failures and fallback, caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import handoff
from handoff.errors import HandoffError


def _net_inputs():
    import kitchen_sink

    torch.manual_seed(1)
    return kitchen_sink.sink_net(), (torch.randn(2, 8),)


def test_priority_order_and_report(sink_plugins):
    model, inputs = _net_inputs()
    # min size 1: the single-node sink partitions stand alone (by default they join sinkb's)
    result = handoff.partition(model, inputs, backends=["sink", "sinkb"], fallback=False,
                               options={"sink": {"ops": "aten.mul.Tensor"},
                                        "sinkb": {"ops": "aten.mul.Tensor,aten.add.Tensor,aten.relu.default"}},
                               default_limits=handoff.Limits(min_size=1))
    report = result.report.to_json()
    assert report["per_backend"]["sink"]["ops"] == {"aten.mul.Tensor": 2}
    assert report["per_backend"]["sinkb"]["ops"] == {"aten.add.Tensor": 2, "aten.relu.default": 2}
    assert report["per_backend"]["aten"]["ops"] == {"aten.sin.default": 1}
    assert report["per_backend"]["aten"]["coverage_percent"] == pytest.approx(100 / 7, abs=0.01)
    sin = next(d for d in report["declined"] if d["op"] == "aten.sin.default")
    assert sin["ran_on"] == "aten"
    assert sin["reasons"] == {"sink": "sink has no kernel for aten.sin.default",
                              "sinkb": "sink has no kernel for aten.sin.default"}
    json.dumps(report)
    x = torch.randn(2, 8)
    with handoff.load(result.to_bytes()) as program:
        np.testing.assert_allclose(program.run([x])[0], model(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_lowering_failure_names_backend_partition_and_op(sink_plugins):
    model, inputs = _net_inputs()
    with pytest.raises(HandoffError) as err:
        handoff.partition(model, inputs, backends=["sink"], fallback=False, options={"sink": {"fail_on": "aten.relu.default"}})
    msg = str(err.value)
    assert msg.startswith("backend 'sink' failed to lower partition sink_0 (")
    assert "first failing op: relu (aten.relu.default): sink refuses aten.relu.default" in msg
    assert msg.endswith("retry with --on-lower-error=fallback or drop 'sink' from --backends")


def test_first_failing_op_is_found_when_the_compiler_does_not_say(sink_plugins):
    model, inputs = _net_inputs()
    with pytest.raises(HandoffError) as err:
        handoff.partition(model, inputs, backends=["sink"], fallback=False, options={"sink": {"crash_on": "aten.add.Tensor"}})
    assert "first failing op: add (aten.add.Tensor): internal compiler error 0x2a" in str(err.value)


def test_lowering_failure_falls_back_to_next_backend(sink_plugins):
    model, inputs = _net_inputs()
    result = handoff.partition(model, inputs, backends=["sink", "sinkb"], fallback=False, on_lower_error="fallback",
                               options={"sink": {"fail_on": "aten.relu.default"}})
    report = result.report.to_json()
    assert report["moves"], "the failed partition must be reported as moved"
    move = report["moves"][0]
    assert move["backend"] == "sink" and "sink refuses aten.relu.default" in move["reason"]
    moved = set(move["nodes"])
    assert report["per_backend"]["sinkb"]["nodes"] >= 1
    for d in report["declined"]:
        if d["node"] in moved:
            assert "lowering of" in d["reasons"]["sink"]
    x = torch.randn(2, 8)
    with handoff.load(result.to_bytes()) as program:
        np.testing.assert_allclose(program.run([x])[0], model(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_a_lowering_failure_is_cached_with_its_first_failing_op(sink_plugins, monkeypatch):
    """A partition that failed to lower is cached like a blob (backend, code, options, content):
    planning it again neither compiles it nor probes its nodes one by one for the first failing
    op, and the report still gives the op and the compiler's words; use_cache=False retries."""
    import kitchen_sink

    compiled: list[str] = []
    real = kitchen_sink.SinkCompiler.preprocess

    def preprocess(self, ep, name):
        compiled.append(name)
        return real(self, ep, name)

    monkeypatch.setattr(kitchen_sink.SinkCompiler, "preprocess", preprocess)
    model, inputs = _net_inputs()
    crash = {"sink": {"crash_on": "aten.add.Tensor"}}

    def run(**kwargs):
        compiled.clear()
        result = handoff.partition(model, inputs, backends=["sink", "sinkb"], fallback=False,
                                   on_lower_error="fallback", options=crash, **kwargs)
        return result.report.to_json()["moves"], [n for n in compiled if n.startswith("sink_")]

    moves, sink_compiles = run()
    assert len(sink_compiles) > 1  # the partition, then its nodes one by one up to the culprit
    assert moves[0]["backend"] == "sink"
    assert "failed at add (aten.add.Tensor): internal compiler error 0x2a" in moves[0]["reason"]
    again, sink_compiles = run()
    assert sink_compiles == []
    assert again[0]["nodes"] == moves[0]["nodes"]
    assert again[0]["reason"] == moves[0]["reason"] + " (a cached failure of this partition; --no-cache compiles it again)"
    _, sink_compiles = run(use_cache=False)
    assert len(sink_compiles) > 1
    compiled.clear()
    with pytest.raises(HandoffError, match=r"first failing op: add \(aten\.add\.Tensor\): internal compiler error 0x2a "
                                           r"\(a cached failure of this partition; --no-cache compiles it again\); retry"):
        handoff.partition(model, inputs, backends=["sink"], fallback=False, options=crash)
    assert compiled == []
    compiled.clear()
    other = handoff.partition(model, inputs, backends=["sink", "sinkb"], fallback=False, on_lower_error="fallback",
                              options={"sink": {"crash_on": "aten.mul.Tensor"}})  # other options: another key
    assert "failed at" in other.report.to_json()["moves"][0]["reason"] and len(compiled) > 1


def test_partitions_of_one_export_share_its_decomposition(sink_plugins, monkeypatch):
    """With one handoff.export.Decompositions, partition() calls on the same ExportedProgram whose
    backends keep the same ops whole decompose it once; other kept ops or another export, again."""
    import kitchen_sink
    from handoff import export

    made: list[list[str]] = []
    real = export._decompose

    def decompose(ep, keep_ops, name):
        made.append(sorted(map(str, keep_ops)))
        return real(ep, keep_ops, name)

    monkeypatch.setattr(export, "_decompose", decompose)
    model, inputs = _net_inputs()
    exported = torch.export.export(model, inputs)
    shared = export.Decompositions()
    first = handoff.partition(exported, backends=["sink"], fallback=False, decompositions=shared)
    second = handoff.partition(exported, backends=["sinkb", "sink"], fallback=False, decompositions=shared)
    assert made == [[]] and second.exported is first.exported and (shared.misses, shared.hits) == (1, 1)
    x = torch.randn(2, 8)
    with handoff.load(second.to_bytes()) as program:
        np.testing.assert_allclose(program.run([x])[0], model(x).detach().numpy(), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(kitchen_sink.SinkCompiler, "ops_to_not_decompose", lambda self: [torch.ops.aten.relu.default])
    kept = handoff.partition(exported, backends=["sink"], fallback=False, decompositions=shared)
    assert made == [[], ["aten.relu.default"]] and kept.exported is not first.exported
    handoff.partition(torch.export.export(model, inputs), backends=["sink"], fallback=False, decompositions=shared)
    assert len(made) == 3
    handoff.partition(exported, backends=["sink"], fallback=False)  # without one: decomposed in the call
    assert len(made) == 4


def test_fused_patterns_stay_together(sink_plugins):
    model, inputs = _net_inputs()
    result = handoff.partition(model, inputs, backends=["sink"], fallback=False,
                               options={"sink": {"fuse": "1", "ops": "aten.mul.Tensor,aten.add.Tensor"}})
    # relu is declined, so each mul that feeds a relu is declined with it
    reasons = {d["node"]: d["reasons"]["sink"] for d in result.report.declined}
    assert any("fused pattern with relu" in r for r in reasons.values())


def test_lowering_cache_hits_on_second_run(sink_plugins):
    model, inputs = _net_inputs()
    first = handoff.partition(model, inputs, backends=["sink"], fallback=False)
    second = handoff.partition(model, inputs, backends=["sink"], fallback=False)
    assert first.report.stats["sink"].cached_partitions == 0
    assert second.report.stats["sink"].cached_partitions == first.report.stats["sink"].partitions > 0
    assert first.to_bytes() == second.to_bytes()


def test_lowering_cache_key_includes_shapes(sink_plugins):
    """The same graph on inputs of another shape is another blob (a backend may specialise on
    shapes, as TVM does), though str(graph) reads the same."""
    model, (x,) = _net_inputs()
    first = handoff.partition(model, (x,), backends=["sink"], fallback=False)
    wider = handoff.partition(model, (torch.randn(3, 8),), backends=["sink"], fallback=False)
    assert first.report.stats["sink"].partitions == wider.report.stats["sink"].partitions > 0
    assert wider.report.stats["sink"].cached_partitions == 0
    again = handoff.partition(model, (torch.randn(3, 8),), backends=["sink"], fallback=False)
    assert again.report.stats["sink"].cached_partitions == again.report.stats["sink"].partitions


def test_no_fallback_error_lists_reasons(sink_plugins):
    model, inputs = _net_inputs()
    with pytest.raises(HandoffError) as err:
        handoff.partition(model, inputs, backends=["sink"], fallback=False, aten=False)
    assert str(err.value) == ("1 node(s) not claimed by any backend (--no-fallback): sin (aten.sin.default): "
                              "sink: sink has no kernel for aten.sin.default")


def test_presets_expand(sink_plugins):
    with pytest.raises(HandoffError) as err:
        handoff.partition("sink:x", backends=["preset:android"])
    assert str(err.value).startswith("backend 'qnn' not installed")
    with pytest.raises(HandoffError, match="unknown preset 'mars'; presets: android, ios"):
        handoff.partition("sink:x", backends=["preset:mars"])


def test_export_failure_is_one_line_with_hint(sink_plugins):
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(HandoffError) as err:
        handoff.partition(DataDependent(), (torch.randn(3),), backends=["sink"], fallback=False)
    msg = str(err.value)
    assert msg.startswith("torch.export failed for DataDependent: ") and "hint:" in msg and "\n" not in msg


def test_mutating_model_is_refused(sink_plugins):
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(1))

        def forward(self, x):
            self.n.add_(1)
            return x + self.n

    with pytest.raises(HandoffError, match=r"mutates state \(n\)"):
        handoff.partition(Counter(), (torch.randn(3),), backends=["sink"], fallback=False)


def test_a_dtype_the_format_cannot_hold_is_one_line_naming_the_node_and_the_choices():
    """A tensor of a dtype the program format has no code for (complex64) is refused where it is
    written, naming the node, the format version, every supported dtype and the fix; a dtype
    argument goes through the same check (``uint16`` since format 1.5)."""
    from handoff.lower import dtype_name
    from handoff.program import DTYPES, FORMAT_MAJOR, FORMAT_MINOR

    with pytest.raises(HandoffError) as info:
        dtype_name(torch.complex64, "node mul_1")
    assert str(info.value) == (f"node mul_1: dtype complex64 is not supported by program format "
                               f"{FORMAT_MAJOR}.{FORMAT_MINOR} (supported: {', '.join(DTYPES)}); cast it in the model")
    assert dtype_name(torch.uint16, "node q") == "uint16"
