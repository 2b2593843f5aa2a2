"""handoff compare and run --check-against: measurements in worker processes, consistent JSON,
CSV and the chart, and per-delegate numerics that single out the delegate carrying an error."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import handoff
from handoff import plugins as plugins_module
from handoff.cli import main
from handoff.compare import NOT_RUNNABLE, OK, compare
from handoff.program import ProgramFile
from handoff.strategies import parse

ALL_OPS = "aten.add.Tensor,aten.mul.Tensor,aten.relu.default,aten.sin.default"
WHOLE = f"sink[ops={ALL_OPS}]"  # one delegate
SPLIT = "sink,sinkb[ops=aten.sin.default]"  # sink, sinkb (sin), sink
WRONG = "sink,sinkb[ops=aten.sin.default,wrong_op=aten.sin.default]"


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_two_strategies_json_csv_and_chart(sink_plugins, capsys, tmp_path):
    png, csv_path, json_path = tmp_path / "c.png", tmp_path / "c.csv", tmp_path / "c.json"
    code, out, err = _run(capsys, "compare", "zoo:sink_net", "--strategy", WHOLE, "--strategy", SPLIT,
                          "--per-delegate", "--runs", "12", "--rounds", "3", "--warmup", "1", "--no-fallback",
                          "--json", str(json_path), "--csv", str(csv_path), "--plot", str(png))
    assert code == 0, err
    assert "Compare zoo:sink_net: 2 strategies" in out and "Per delegate" in out and f"wrote {png}" in out
    assert "sink[ops=" in out  # the options in brackets are not taken for rich markup
    result = json.loads(json_path.read_text())
    assert result["model"] == "zoo:sink_net" and result["runs"] == 12 and result["rounds"] == 3
    assert "by_key" not in result and result["devices"] == {}
    whole, split = result["strategies"]
    for s in (whole, split):
        assert s["status"] == OK and s["runs"] == 12
        assert sum(s["coverage_percent"].values()) == pytest.approx(100.0, abs=0.05)
        assert s["p50_ms"] > 0 and s["p90_ms"] >= s["p50_ms"] and s["load_ms"] > 0 and s["first_run_ms"] > 0
        assert s["program_bytes"] > 0 and s["compile_seconds"] >= 0
        assert s["max_abs_error"] <= 1e-5 and (s["snr_db"] == "inf" or s["snr_db"] > 100)
        assert s["per_delegate"] and all(d["max_abs_error"] <= 1e-5 and not d["mismatch"] for d in s["per_delegate"])
    assert whole["coverage_percent"] == {"sink": 100.0} and whole["delegates"] == {"sink": 1}
    assert split["delegates"] == {"sink": 2, "sinkb": 1} and split["delegate_count"] == 3
    assert split["crossings"] > whole["crossings"]
    assert [d["backend"] for d in split["per_delegate"]] == ["sink", "sinkb", "sink"]
    assert split["per_delegate"][1]["ops"] == {"aten.sin.default": 1}
    assert split["declined"]["aten.sin.default"]["reason"] == "sink has no kernel for aten.sin.default"
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["strategy"] for r in rows] == [WHOLE, SPLIT] and rows[1]["delegates_sinkb"] == "1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_per_delegate_singles_out_the_backend_computing_an_op_wrongly(sink_plugins):
    result = compare("zoo:sink_net", [parse(WRONG, fallback=False)], runs=2, rounds=1, warmup=0, per_delegate=True)
    (s,) = result.strategies
    assert s.max_abs_error > 0.1  # the whole program is off ...
    rows = s.per_delegate
    assert [(r["backend"], r["mismatch"]) for r in rows] == [("sink", False), ("sinkb", True), ("sink", False)]
    wrong = rows[1]
    assert wrong.get("worst") and wrong["ops"] == {"aten.sin.default": 1}
    assert wrong["max_abs_error"] == pytest.approx(0.25, rel=1e-3)  # ... by kitchen_sink.WRONG_BY, at sin alone
    # the delegates after it got eager inputs, so the error does not leak into them
    assert rows[2]["max_abs_error"] == 0.0 and rows[2]["snr_db"] == math.inf


def test_a_backend_that_cannot_run_here_is_lowered_not_run(sink_plugins, monkeypatch, tmp_path):
    real = plugins_module.Plugins.runtime_available

    def no_sinkb(self, backend):
        return (False, "sinkb runs on the moon only") if backend == "sinkb" else real(self, backend)

    monkeypatch.setattr(plugins_module.Plugins, "runtime_available", no_sinkb)
    result = compare("zoo:sink_net", [parse(WHOLE, fallback=False), parse(SPLIT, fallback=False)], runs=2,
                     rounds=1, warmup=0, per_delegate=True, max_workers=1)
    assert result.worker_groups == 2
    whole, split = result.strategies
    assert whole.status == OK and whole.p50_ms is not None
    assert split.status == NOT_RUNNABLE and split.reason == "sinkb: sinkb runs on the moon only"
    assert split.program_bytes > 0 and split.coverage["sinkb"] > 0 and split.p50_ms is None
    assert split.max_abs_error is None and not split.pareto and whole.pareto
    # the delegates that can run here are still checked
    assert [("skipped" in r, r["backend"]) for r in split.per_delegate] == [(False, "sink"), (True, "sinkb"),
                                                                            (False, "sink")]
    j = result.to_json()["strategies"][1]
    assert j["status"] == "not runnable here" and j["p50_ms"] is None
    from handoff.compare_report import plot

    plot(result, tmp_path / "c.png")  # a not-runnable strategy is labelled, not drawn
    assert (tmp_path / "c.png").stat().st_size > 0


def test_delegates_are_still_checked_when_the_whole_program_fails_to_load(sink_plugins):
    """One delegate that does not load (sinkb's runtime refuses it, as lavapipe refused a vulkan
    delegate needing 36 storage buffers) fails the strategy, but --per-delegate still checks every
    other delegate on its own, in a fresh worker, and says why the one that fails was not checked."""
    result = compare("zoo:sink_net", [parse(SPLIT, fallback=False)], runs=2, rounds=1, warmup=0, per_delegate=True,
                     runtime_options={"sinkb": {"fail_load": "1"}})
    (s,) = result.strategies
    assert s.status == "failed" and "refusing to load (fail_load=1)" in s.reason
    assert s.p50_ms is None and s.max_abs_error is None and not s.pareto
    rows = s.per_delegate
    assert [(r["backend"], "skipped" in r) for r in rows] == [("sink", False), ("sinkb", True), ("sink", False)]
    assert "refusing to load (fail_load=1)" in rows[1]["skipped"]
    assert all(r["max_abs_error"] <= 1e-6 and not r["mismatch"] for r in (rows[0], rows[2]))


def test_auto_with_pareto_front_and_stdout_json(sink_plugins, capsys, tmp_path, monkeypatch):
    from handoff import strategies

    # auto over the kitchen sink only (tvm's strategies would compile with TVM: slow tests have those)
    monkeypatch.setattr(strategies, "auto", lambda plugins: [parse(WHOLE), parse(SPLIT), parse(WRONG)])
    code, out, err = _run(capsys, "compare", "zoo:sink_net", "--strategies", "auto", "--runs", "4", "--rounds", "2",
                          "--json", "--plot", str(tmp_path / "p.png"), "--quiet", "--no-fallback")
    assert code == 0, err
    result = json.loads(out)
    assert result["auto"] and result["pareto_objectives"] == ["p50_ms", "program_bytes", "max_abs_error"]
    assert any(s["pareto"] for s in result["strategies"])  # which ones depends on the timings
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_pareto_front_over_latency_size_and_error():
    from handoff.compare import StrategyResult, _mark_pareto

    def measured(name, p50, size, err, status=OK):
        return StrategyResult(parse(name), status=status, samples_ms=[p50], program_bytes=size, max_abs_error=err)

    rs = [measured("fast", 1.0, 900, 1e-3), measured("small", 5.0, 100, 1e-3), measured("exact", 9.0, 900, 0.0),
          measured("dominated", 2.0, 900, 1e-3), measured("tie", 1.0, 900, 1e-3),
          measured("unmeasured", 0.1, 1, 0.0, status=NOT_RUNNABLE)]
    _mark_pareto(rs)
    assert [r.strategy.name for r in rs if r.pareto] == ["fast", "small", "exact", "tie"]


def test_csv_layouts_across_device_keys():
    """Several keys: wide by default (a row per strategy, KEY:field columns); long on request
    (a row per strategy and key). The remote test checks these on real devices."""
    import io

    from handoff.compare import FAILED, CompareResult, StrategyResult
    from handoff.compare_report import write_csv

    fast, slow = parse("sink"), parse("sinkb")
    rows = [StrategyResult(fast, key="a", samples_ms=[1.0, 3.0], max_abs_error=0.0),
            StrategyResult(fast, key="b", status=FAILED, reason="device 'b' died"),
            StrategyResult(slow, key="a", status=NOT_RUNNABLE, reason="sinkb: off"),
            StrategyResult(slow, key="b", samples_ms=[2.0], max_abs_error=1e-6)]
    result = CompareResult("m", rows, 0, 2, 1, 0, 0.0, rpc="h:1", devices={"a": {"target": "host"}, "b": {}})
    outs = {}
    for layout in (None, "long"):
        outs[layout] = io.StringIO()
        write_csv(result, outs[layout], layout)
    wide = list(csv.DictReader(io.StringIO(outs[None].getvalue())))
    assert [(r["strategy"], r["a:status"], r["a:p50_ms"], r["b:status"], r["b:reason"]) for r in wide] == [
        ("sink", "ok", "2.0", "failed", "device 'b' died"), ("sinkb", "not runnable on a", "", "ok", "")]
    long = list(csv.DictReader(io.StringIO(outs["long"].getvalue())))
    assert [(r["strategy"], r["key"], r["status"]) for r in long] == [
        ("sink", "a", "ok"), ("sink", "b", "failed"), ("sinkb", "a", "not runnable on a"), ("sinkb", "b", "ok")]
    assert result.to_json()["by_key"]["sinkb"]["b"]["max_abs_error"] == 1e-6


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "nope"], "strategy 'nope': backend 'nope' not installed; installed: sink, sinkb, tvm"),
    (["--strategy", "sink[speed=3]"], "strategy 'sink[speed=3]': backend 'sink' has no option 'speed'"),
    ([], "no strategies; pass --strategy SPEC"),
    (["--strategy", "sink", "--runs", "0"], "--runs 0, --rounds 10, --warmup 3: need runs and rounds >= 1"),
    (["--strategy", "sink", "--max-workers", "0"], "--max-workers 0: need at least 1"),
    (["--strategy", "sink", "--csv-layout", "wide"], "--csv-layout wide needs --rpc HOST:PORT --key K1,K2"),
])
def test_compare_errors_are_one_line(sink_plugins, capsys, argv, message):
    code, out, err = _run(capsys, "compare", "zoo:sink_net", *argv)
    assert code == 1 and err.startswith(f"handoff: error: {message}") and err.count("\n") == 1


def test_a_strategy_that_fails_to_lower_is_reported_not_fatal(sink_plugins):
    result = compare("zoo:sink_net", [parse("sink[fail_on=aten.relu.default]", fallback=False),
                                      parse(WHOLE, fallback=False)], runs=2, rounds=1, on_lower_error="fail")
    failed, ok = result.strategies
    assert failed.status == "failed" and "backend 'sink' failed to lower partition" in failed.reason
    assert ok.status == OK


def test_run_check_against_names_the_delegate_and_its_ops(sink_plugins, capsys, tmp_path):
    good, bad = tmp_path / "good.hof", tmp_path / "bad.hof"
    for path, spec in ((good, SPLIT), (bad, WRONG)):
        s = parse(spec)
        handoff.partition("zoo:sink_net", backends=list(s.backends), options=s.options,
                          fallback=False).write(str(path))
    code, out, err = _run(capsys, "run", str(good), "--check-against", "zoo:sink_net")
    assert code == 0, err
    assert "against eager zoo:sink_net: max abs error" in out and "Per delegate" in out and "sinkb_0" in out
    code, out, err = _run(capsys, "run", str(bad), "--check-against", "zoo:sink_net", "--json")
    assert code == 1
    assert err.startswith("handoff: error: 1 delegate(s) differ from eager PyTorch by more than 0.001 relative; the "
                          "largest: delegate 1 (sinkb_0, backend 'sinkb'), relative error") and "aten.sin.default" in err
    check = json.loads(out)["check"]
    assert [r["mismatch"] for r in check["per_delegate"]] == [False, True, False]
    code, out, err = _run(capsys, "run", str(bad), "--check-against", "zoo:sink_net", "--tolerance", "0.5")
    assert code == 0, err


def test_check_against_another_model_is_refused(sink_plugins, capsys, tmp_path):
    path = tmp_path / "m.hof"
    handoff.partition("zoo:sink_net", backends=["sink"], options={"sink": {"ops": ALL_OPS}},
                      fallback=False).write(str(path))
    code, out, err = _run(capsys, "run", str(path), "--check-against", "zoo:small_transformer")
    assert code == 1 and err.startswith("handoff: error: zoo:small_transformer does not export with the program's "
                                        "inputs (float32[2, 8])") and "pass the model it was made from" in err


def test_numerics_need_node_names(sink_plugins):
    from handoff import numerics

    result = handoff.partition("zoo:sink_net", backends=["sink"], options={"sink": {"ops": ALL_OPS}}, fallback=False)
    manifest = result.assembled.manifest
    assert all("node" in v for v in manifest["values"])
    for v in manifest["values"]:
        del v["node"]  # a program written before values named their nodes
    with ProgramFile.from_bytes(result.to_bytes()) as pf:
        with pytest.raises(handoff.HandoffError, match="re-partition it with this handoff to check delegates"):
            numerics.delegate_cases(pf, result.exported, [torch.randn(2, 8)])


def test_each_backend_is_asked_about_the_model_once(sink_plugins, monkeypatch):
    """The decomposition of the export, capability (support, fused_patterns) and check_partition
    answers are shared by the strategies of one run, and by later runs through $HANDOFF_HOME/capability; with
    use_cache=False (--no-cache) nothing is kept on disk."""
    import kitchen_sink

    asked: list[tuple[str, ...]] = []
    real_support, real_check = kitchen_sink.SinkCompiler.support, kitchen_sink.SinkCompiler.check_partition

    def support(self, ep):
        asked.append(("support", self.options["ops"]))
        return real_support(self, ep)

    def check_partition(self, ep, nodes):
        asked.append(("check", self.options["ops"], *nodes))
        return real_check(self, ep, nodes)

    monkeypatch.setattr(kitchen_sink.SinkCompiler, "support", support)
    monkeypatch.setattr(kitchen_sink.SinkCompiler, "check_partition", check_partition)
    from handoff import export

    decomposed: list[str] = []
    real_decompose = export._decompose
    monkeypatch.setattr(export, "_decompose", lambda ep, keep, name: decomposed.append(name) or real_decompose(ep, keep, name))
    sinkb = "sinkb[ops=aten.sin.default,max_nodes=1]"
    strategies = [parse(s, fallback=False) for s in (f"sink,{sinkb}", f"{sinkb},sink", "sink")]
    first = compare("zoo:sink_net", strategies, runs=1, rounds=1, warmup=0)
    assert [s.status for s in first.strategies] == [OK] * 3
    assert decomposed == ["zoo:sink_net"]  # the three keep the same ops whole: one decomposition
    assert sorted(q for q in asked if q[0] == "support") == [("support", "aten.add.Tensor,aten.mul.Tensor,"
                                                             "aten.relu.default"), ("support", "aten.sin.default")]
    checks = [q for q in asked if q[0] == "check"]
    assert checks and len(set(checks)) == len(checks)  # each partition checked once, though planned 3 times
    asked.clear()
    again = compare("zoo:sink_net", strategies[:1], runs=1, rounds=1, warmup=0)
    assert asked == [] and again.strategies[0].coverage == first.strategies[0].coverage
    for _ in range(2):
        handoff.partition("zoo:sink_net", backends=["sink"], fallback=False, use_cache=False)
    assert [q for q in asked if q[0] == "support"] == [("support", kitchen_sink.DEFAULT_OPS)] * 2


MASKED = """
import torch


class Masked(torch.nn.Module):
    def forward(self, x):
        ids = torch.arange(8)
        return x * torch.where(ids[:, None] >= ids[None, :], 1.0, 0.5)


def example_inputs():
    return (torch.randn(8, 8),)
"""


def test_a_strategy_may_partition_without_folding(sink_plugins, tmp_path):
    """``fold: false`` reaches partition: the mask is computed on the host at every run instead of
    stored, and the per-delegate check exports the model the way each program was made."""
    (tmp_path / "masked.py").write_text(MASKED)
    ops = "sink[ops=aten.mul.Tensor]"
    result = compare(f"{tmp_path / 'masked.py'}:Masked", [parse(ops, "folded", fallback=False),
                                                          parse(ops, "unfolded", fallback=False, fold=False)],
                     runs=2, rounds=1, warmup=0, per_delegate=True, max_workers=1)
    folded, unfolded = result.strategies
    assert folded.status == unfolded.status == OK, (folded.reason, unfolded.reason)
    assert "aten.arange.start_step" in unfolded.declined and "aten.arange.start_step" not in folded.declined
    assert folded.coverage == {"sink": 100.0} and unfolded.coverage["sink"] < 100.0
    assert folded.max_abs_error == unfolded.max_abs_error == 0.0
    # each program's delegate checked against the graph it was cut from (folded or not)
    for s in (folded, unfolded):
        (d,) = s.per_delegate
        assert (d["backend"], d["ops"], d["max_abs_error"], d["mismatch"]) == ("sink", {"aten.mul.Tensor": 1}, 0.0, False)
    assert [s["fold"] for s in result.to_json()["strategies"]] == [True, False]
