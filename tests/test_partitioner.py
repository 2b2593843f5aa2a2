"""The priority partitioner: exact assignment, acyclic partitions, limits, work linear in the
graph size, outputs equal to eager."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handoff
from handoff.errors import HandoffError
from handoff import partitioner
from handoff.partitioner import HOST, GraphView, Limits, Partition, plan


def _view(edges: dict[str, list[str]]) -> GraphView:
    order = list(edges)
    return GraphView(order=order, preds=edges, ops={n: f"op_{n}" for n in order})


def _check_plan(view: GraphView, result) -> None:
    """Every node exactly once; steps are an execution order (hence no cycle between partitions)."""
    seen: list[str] = []
    position: dict[str, int] = {}
    for i, step in enumerate(result.steps):
        names = step.nodes if isinstance(step, Partition) else [step]
        seen.extend(names)
        for n in names:
            position[n] = i
    assert sorted(seen) == sorted(view.order)
    assert set(result.assignment) == set(view.order)
    for n in view.order:
        for p in view.preds[n]:
            assert position[p] <= position[n], f"{p} -> {n} runs backwards"
            if position[p] == position[n]:
                assert isinstance(result.steps[position[n]], Partition)


def test_priority_first_backend_claims_first():
    view = _view({"a": [], "b": ["a"], "c": ["b"]})
    support = {"x": {"a": None, "b": None, "c": "no"}, "y": {"a": None, "b": None, "c": None}}
    result = plan(view, ["x", "y"], support)
    assert result.assignment == {"a": "x", "b": "x", "c": "y"}
    assert result.reasons["c"] == {"x": "no"}
    _check_plan(view, result)


def test_merge_that_would_make_a_cycle_is_refused():
    # a -> b -> c and a -> c, with b on another backend: {a, c} in one partition would need b's
    # output before it could start and feed b at the same time.
    view = _view({"a": [], "b": ["a"], "c": ["a", "b"]})
    support = {"x": {"a": None, "b": "declined", "c": None}, "y": {"a": None, "b": None, "c": None}}
    result = plan(view, ["x", "y"], support)
    parts = [p.nodes for p in result.partitions if p.backend == "x"]
    assert ["a", "c"] not in parts
    _check_plan(view, result)


def test_two_partitions_that_feed_each_other_are_not_formed():
    # x1 -> y1 -> x2 and y0 -> x1 ... the classic case convexity alone misses:
    # a1 -> b1, b2 -> a2 with a1, a2 on x and b1, b2 on y must not give x:{a1,a2}, y:{b1,b2}
    # if b1 -> b2 (then y's partition would need x's output and x's would need y's).
    view = _view({"a1": [], "b1": ["a1"], "b2": ["b1"], "a2": ["b2", "a1"]})
    support = {"x": {"a1": None, "a2": None, "b1": "n", "b2": "n"}, "y": {"b1": None, "b2": None}}
    result = plan(view, ["x", "y"], support)
    _check_plan(view, result)


def test_min_partition_size_releases_to_next_backend():
    view = _view({"a": [], "b": ["a"], "c": ["b"], "d": ["c"]})
    support = {"x": {"a": None, "b": "n", "c": None, "d": None}, "y": {n: None for n in "abcd"}}
    result = plan(view, ["x", "y"], support, limits={"x": Limits(min_size=2)})
    assert result.assignment["a"] == "y"
    assert "below --min-partition-size 2" in result.reasons["a"]["x"]
    assert result.assignment["c"] == result.assignment["d"] == "x"
    _check_plan(view, result)


def test_max_partitions_keeps_the_largest():
    view = _view({"a": [], "b": ["a"], "c": ["b"], "d": ["c"], "e": ["d"]})
    support = {"x": {"a": None, "b": "n", "c": None, "d": None, "e": None}}
    result = plan(view, ["x"], support, limits={"x": Limits(max_partitions=1)})
    assert [p.nodes for p in result.partitions] == [["c", "d", "e"]]
    assert "--max-partitions 1" in result.reasons["a"]["x"]
    assert result.assignment["a"] == HOST


def test_fused_pattern_is_all_or_nothing():
    view = _view({"m": [], "r": ["m"], "s": ["r"]})
    support = {"x": {"m": None, "r": "nope", "s": None}}
    result = plan(view, ["x"], support, patterns={"x": [["m", "r"]]})
    assert result.assignment["m"] == HOST
    assert "fused pattern with r (op_r)" in result.reasons["m"]["x"]


def test_no_host_lists_every_backend_reason():
    view = _view({"a": [], "b": ["a"]})
    support = {"x": {"a": None, "b": "x says no"}, "y": {"a": None, "b": "y says no"}}
    with pytest.raises(HandoffError) as err:
        plan(view, ["x", "y"], support, allow_host=False, no_host_reason="--no-fallback")
    assert str(err.value) == ("1 node(s) not claimed by any backend (--no-fallback): b (op_b): x: x says no, "
                              "y: y says no")


def test_excluded_nodes_move_on_with_their_reason():
    view = _view({"a": [], "b": ["a"]})
    support = {"x": {"a": None, "b": None}, "y": {"a": None, "b": None}}
    result = plan(view, ["x", "y"], support, excluded={"b": {"x": "lowering failed"}})
    assert result.assignment == {"a": "x", "b": "y"}
    assert result.reasons["b"] == {"x": "lowering failed"}


@st.composite
def random_dags(draw):
    n = draw(st.integers(1, 40))
    edges = {}
    for i in range(n):
        k = draw(st.integers(0, min(i, 3)))
        edges[f"n{i}"] = sorted(set(draw(st.lists(st.integers(0, i - 1), min_size=k, max_size=k)))) if i else []
        edges[f"n{i}"] = [f"n{j}" for j in edges[f"n{i}"]]
    backends = ["x", "y", "z"]
    support = {b: {f"n{i}": (None if draw(st.booleans()) else f"{b} declines") for i in range(n)} for b in backends}
    limits = {b: Limits(min_size=draw(st.integers(1, 3)), max_partitions=draw(st.one_of(st.none(), st.integers(1, 3))))
              for b in backends}
    return edges, support, limits


@settings(max_examples=300, deadline=None)
@given(random_dags())
def test_property_random_dags_assign_once_and_stay_acyclic(case):
    edges, support, limits = case
    view = _view(edges)
    result = plan(view, ["x", "y", "z"], support, limits=limits)
    _check_plan(view, result)
    for p in result.partitions:
        assert all(support[p.backend][n] is None for n in p.nodes)
        assert len(p.nodes) >= limits[p.backend].min_size
    for b in "xyz":
        if limits[b].max_partitions is not None:
            assert sum(p.backend == b for p in result.partitions) <= limits[b].max_partitions


# -- work: the reachability searches stay linear in the graph size (counted, never timed) ------------


def _chain(n: int) -> GraphView:
    return _view({f"n{i}": [f"n{i - 1}"] if i else [] for i in range(n)})


def _branchy(n: int, width: int = 4, length: int = 3) -> GraphView:
    """Blocks of ``width`` parallel branches of ``length`` nodes joined with a skip connection."""
    edges: dict[str, list[str]] = {"in": []}
    last, block = "in", 0
    while len(edges) < n:
        ends = []
        for b in range(width):
            prev = last
            for k in range(length):
                prev, edges[f"b{block}_{b}_{k}"] = f"b{block}_{b}_{k}", [prev]
            ends.append(prev)
        edges[f"join{block}"] = [*ends, last]
        last, block = f"join{block}", block + 1
    return _view(edges)


def _counted_plan(monkeypatch, view, backends, support, **kwargs):
    made: list = []

    class Counting(partitioner._Groups):
        def __init__(self, v):
            super().__init__(v)
            made.append(self)

    monkeypatch.setattr(partitioner, "_Groups", Counting)
    result = plan(view, backends, support, **kwargs)
    return result, made[0]


@pytest.mark.parametrize("kind", ["chain", "branchy", "branchy_wide"])
@pytest.mark.parametrize("claims", ["all", "runs", "random"])
def test_reachability_work_is_linear(monkeypatch, kind, claims):
    import random

    view = {"chain": lambda: _chain(4000), "branchy": lambda: _branchy(4000),
            "branchy_wide": lambda: _branchy(4000, width=16, length=2)}[kind]()
    rng = random.Random(0)
    if claims == "all":
        support = {"x": {n: None for n in view.order}}
    elif claims == "runs":  # x and y alternate in runs of 5 nodes
        support = {"x": {n: None if i // 5 % 2 else "n" for i, n in enumerate(view.order)},
                   "y": {n: None for n in view.order}}
    else:
        support = {b: {n: None if rng.random() < 0.5 else "n" for n in view.order} for b in "xyz"}
    limits = {b: Limits(max_partitions=len(view.order) // 10) for b in support}
    result, groups = _counted_plan(monkeypatch, view, list(support), support, limits=limits)
    _check_plan(view, result)
    assert groups.visits < 20 * len(view.order)
    assert groups.relabels <= len(support)  # one after each backend's releases, none for gaps


# -- end to end on random torch graphs, through the kitchen-sink backends and host ATen ops ----------

OPS = ["add", "mul", "sub", "relu", "neg", "sin", "tanh", "cumsum"]


@st.composite
def random_programs(draw):
    steps = []
    for i in range(draw(st.integers(1, 14))):
        op = draw(st.sampled_from(OPS))
        a = draw(st.integers(0, i))  # value 0 is the input
        b = draw(st.integers(0, i))
        steps.append((op, a, b))
    outputs = sorted(set(draw(st.lists(st.integers(1, len(steps)), min_size=1, max_size=3))))
    ops_a = draw(st.sets(st.sampled_from(["aten.add.Tensor", "aten.mul.Tensor", "aten.relu.default", "aten.sin.default"])))
    ops_b = draw(st.sets(st.sampled_from(["aten.sub.Tensor", "aten.neg.default", "aten.tanh.default", "aten.mul.Tensor"])))
    return steps, outputs, ops_a, ops_b


def _module(steps, outputs):
    import torch

    class Random(torch.nn.Module):
        def forward(self, x):
            vals = [x]
            for op, a, b in steps:
                u, v = vals[a], vals[b]
                vals.append({"add": lambda: u + v, "mul": lambda: u * v, "sub": lambda: u - v,
                             "relu": lambda: torch.relu(u), "neg": lambda: -u, "sin": lambda: torch.sin(u),
                             "tanh": lambda: torch.tanh(u), "cumsum": lambda: torch.cumsum(u, 1)}[op]())
            return tuple(vals[o] for o in outputs)

    return Random()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(random_programs())
def test_property_random_models_match_eager(sink_plugins, case):
    import torch

    steps, outputs, ops_a, ops_b = case
    model = _module(steps, outputs)
    opts = {}
    if ops_a:
        opts["sink"] = {"ops": ",".join(sorted(ops_a))}
    if ops_b:
        opts["sinkb"] = {"ops": ",".join(sorted(ops_b))}
    chosen = [b for b in ("sink", "sinkb") if b in opts]
    x = torch.randn(2, 5)
    result = handoff.partition(model, (x,), backends=chosen, options=opts, fallback=False, aten=True, use_cache=False)
    report = result.report
    assert sum(s.nodes for s in report.stats.values()) == report.total_nodes
    with handoff.load(result.to_bytes()) as program:
        fresh = torch.randn(2, 5)
        got = program.run([fresh])
    with torch.no_grad():
        want = model(fresh)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)
