"""The priority partitioner: exact assignment, acyclic partitions, limits, islands joining a
neighbour, work linear in the graph size, outputs equal to eager."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handoff
from handoff.errors import HandoffError
from handoff import partitioner
from handoff.partitioner import HOST, GraphView, IslandMove, Limits, Partition, plan


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


def test_island_below_min_partition_size_joins_the_next_backends_neighbour():
    view = _view({"a": [], "b": ["a"], "c": ["b"], "d": ["c"]})
    support = {"x": {"a": None, "b": "n", "c": None, "d": None}, "y": {n: None for n in "abcd"}}
    result = plan(view, ["x", "y"], support, limits={"x": Limits(min_size=2)})
    assert result.assignment["a"] == "y"
    assert result.reasons["a"]["x"] == ("island of 1 node(s) below --min-partition-size 2 joined y_0, "
                                        "which also takes it")
    assert result.moves == [IslandMove(["a"], "x", "y", "y_0", result.reasons["a"]["x"])]
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


# -- islands: partitions below --min-partition-size join a neighbour of another backend ---------------


def _small_cnn() -> GraphView:
    """18 nodes: two stem convs, two residual blocks (conv, relu, conv, add, relu), a head."""
    edges = {"conv0": [], "relu0": ["conv0"], "conv1": ["relu0"], "relu1": ["conv1"]}
    block_in = "relu1"
    for b in (1, 2):
        edges[f"c{b}a"] = [block_in]
        edges[f"r{b}a"] = [f"c{b}a"]
        edges[f"c{b}b"] = [f"r{b}a"]
        edges[f"add{b}"] = [f"c{b}b", block_in]
        edges[f"r{b}b"] = [f"add{b}"]
        block_in = f"r{b}b"
    edges.update({"pool": [block_in], "flat": ["pool"], "fc": ["flat"], "softmax": ["fc"]})
    ops = {n: "relu" if n.startswith("r") else "add" if n.startswith("add") else "conv" for n in edges}
    return GraphView(order=list(edges), preds=edges, ops=ops)


def _cnn_support(view: GraphView) -> dict[str, dict[str, str | None]]:
    return {"fast": {n: None if view.ops[n] in ("relu", "add") else "only relu and add" for n in view.order},
            "tvm": {n: None for n in view.order}}


def test_small_cnn_alternates_without_a_min_size():
    view = _small_cnn()
    result = plan(view, ["fast", "tvm"], _cnn_support(view))
    backends = [s.backend for s in result.steps]
    assert len(backends) == 13 and all(a != b for a, b in zip(backends, backends[1:]))
    assert result.moves == []
    _check_plan(view, result)


def test_small_cnn_islands_join_the_fallback_into_one_partition():
    view = _small_cnn()
    result = plan(view, ["fast", "tvm"], _cnn_support(view), limits={"fast": Limits(min_size=3)})
    assert [(p.backend, p.nodes) for p in result.partitions] == [("tvm", view.order)]
    fast_nodes = [n for n in view.order if view.ops[n] in ("relu", "add")]
    assert sorted(n for m in result.moves for n in m.nodes) == sorted(fast_nodes)
    assert {(m.from_backend, m.to_backend, m.to_partition) for m in result.moves} == {("fast", "tvm", "tvm_0")}
    assert [m.nodes for m in result.moves if len(m.nodes) > 1] == [["add1", "r1b"], ["add2", "r2b"]]
    assert result.reasons["add1"]["fast"] == ("island of 2 node(s) below --min-partition-size 3 joined tvm_0, "
                                              "which also takes it")
    _check_plan(view, result)


def test_island_nobody_else_supports_stays_with_its_backend():
    view = _view({"a": [], "b": ["a"], "c": ["b"]})
    support = {"x": {"a": "n", "b": None, "c": "n"}, "y": {"a": None, "b": "y declines", "c": None}}
    result = plan(view, ["x", "y"], support, limits={"x": Limits(min_size=2)})
    assert result.assignment == {"a": "y", "b": "x", "c": "y"}
    assert result.moves == [] and "x" not in result.reasons.get("b", {})


def test_island_never_joins_the_host_or_an_excluded_backend():
    view = _view({"a": [], "b": ["a"], "c": ["b"]})
    support = {"x": {"a": "n", "b": None, "c": None}, "y": {n: None for n in "abc"}}
    result = plan(view, ["x", "y"], support, limits={"x": Limits(min_size=3)}, excluded={"b": {"y": "lowering failed"}})
    assert result.assignment == {"a": "y", "b": "x", "c": "x"}
    assert result.moves == []


def test_island_prefers_the_largest_neighbour():
    view = _view({"p": [], "i": ["p"], "q1": ["i"], "q2": ["q1"]})
    support = {"x": {"p": "n", "i": None, "q1": "n", "q2": "n"}, "y": {"p": None, "i": None, "q1": "n", "q2": "n"},
               "z": {"p": "n", "i": None, "q1": None, "q2": None}}
    result = plan(view, ["x", "y", "z"], support, limits={"x": Limits(min_size=2)})
    assert result.assignment == {"p": "y", "i": "z", "q1": "z", "q2": "z"}
    assert result.moves == [IslandMove(["i"], "x", "z", "z_0", result.reasons["i"]["x"])]


def test_island_is_looked_at_again_when_its_neighbour_moves():
    # i (x) can only go to z, which it does not touch until its neighbour j (a y island) joins z's q
    view = _view({"p": [], "i": ["p"], "j": ["i"], "q": ["j"]})
    support = {"x": {"p": "n", "i": None, "j": "n", "q": "n"}, "y": {"p": "n", "i": "n", "j": None, "q": "n"},
               "z": {"p": "n", "i": None, "j": None, "q": None}}
    result = plan(view, ["x", "y", "z"], support, limits={"x": Limits(min_size=2), "y": Limits(min_size=2)})
    assert result.assignment == {"p": HOST, "i": "z", "j": "z", "q": "z"}
    assert [(m.nodes, m.from_backend, m.to_backend) for m in result.moves] == [(["j"], "y", "z"), (["i"], "x", "z")]


def test_island_moves_never_split_a_fused_pattern():
    # x's pattern [a, b] is an island of 2: it moves whole
    view = _view({"p": [], "a": ["p"], "b": ["a"], "q": ["b"]})
    support = {"x": {"p": "n", "a": None, "b": None, "q": "n"}, "y": {n: None for n in "pabq"}}
    result = plan(view, ["x", "y"], support, patterns={"x": [["a", "b"]]}, limits={"x": Limits(min_size=3)})
    assert [(m.nodes, m.to_partition) for m in result.moves] == [(["a", "b"], "y_0")]
    assert [p.nodes for p in result.partitions] == [["p", "a", "b", "q"]]
    # y's pattern [c, r] lost r to x, so c went to the host; r must not join y without c
    view = _view({"c": [], "r": ["c"], "d": ["r"]})
    support = {"x": {"c": "n", "r": None, "d": "n"}, "y": {n: None for n in "crd"}}
    result = plan(view, ["x", "y"], support, patterns={"y": [["c", "r"]]}, limits={"x": Limits(min_size=2)})
    assert result.assignment == {"c": HOST, "r": "x", "d": "y"}
    assert result.moves == []


def test_island_join_that_would_make_a_cycle_is_refused():
    # i -> h -> j and i -> j with h on the host: i joining y's j would need h's output before it
    # could start and feed h at the same time
    view = _view({"i": [], "h": ["i"], "j": ["i", "h"]})
    support = {"x": {"i": None, "h": "n", "j": "n"}, "y": {"i": None, "h": "n", "j": None}}
    result = plan(view, ["x", "y"], support, limits={"x": Limits(min_size=2)})
    assert result.assignment == {"i": "x", "h": HOST, "j": "y"}
    assert result.moves == []


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
    limits = {b: Limits(min_size=draw(st.integers(1, 4)), max_partitions=draw(st.one_of(st.none(), st.integers(1, 3))))
              for b in backends}
    data_edges = [(p, c) for c, ps in edges.items() for p in ps]
    patterns = {b: [list(e) for e in draw(st.lists(st.sampled_from(data_edges), max_size=2))] if data_edges else []
                for b in backends}
    return edges, support, limits, patterns


def _steps_graph(view: GraphView, result) -> tuple[dict[str, int], dict[int, set[int]]]:
    """Node -> step index, and the contracted graph's edges between steps."""
    position = {n: i for i, s in enumerate(result.steps) for n in (s.nodes if isinstance(s, Partition) else [s])}
    succ: dict[int, set[int]] = {i: set() for i in range(len(result.steps))}
    for n in view.order:
        for p in view.preds[n]:
            if position[p] != position[n]:
                succ[position[p]].add(position[n])
    return position, succ


def _reaches_via_other(succ: dict[int, set[int]], a: int, b: int) -> bool:
    stack = [s for s in succ[a] if s != b]
    seen = set(stack)
    while stack:
        for s in succ[stack.pop()]:
            if s == b:
                return True
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return False


def _check_no_island_can_move(view, result, support, limits, patterns) -> None:
    """The island rule reached its fixed point: no island has a neighbour that could take it."""
    position, succ = _steps_graph(view, result)
    for i, island in enumerate(result.steps):
        if not isinstance(island, Partition) or len(island.nodes) >= limits[island.backend].min_size:
            continue
        for j in succ[i] | {k for k, ss in succ.items() if i in ss}:
            target = result.steps[j]
            if not isinstance(target, Partition) or target.backend == island.backend:
                continue
            joined = {*island.nodes, *target.nodes}
            blocked = (any(support[target.backend][n] is not None for n in island.nodes)
                       or any(set(p) & set(island.nodes) and not set(p) <= joined for p in patterns[target.backend])
                       or _reaches_via_other(succ, i, j) or _reaches_via_other(succ, j, i))
            assert blocked, f"{island.name} could still join {target.name}"


@settings(max_examples=300, deadline=None)
@given(random_dags())
def test_property_random_dags_assign_once_and_stay_acyclic(case):
    edges, support, limits, patterns = case
    view = _view(edges)
    result = plan(view, ["x", "y", "z"], support, patterns=patterns, limits=limits)
    _check_plan(view, result)
    for p in result.partitions:
        assert all(support[p.backend][n] is None for n in p.nodes)
    for b in "xyz":
        if limits[b].max_partitions is not None:
            assert sum(p.backend == b for p in result.partitions) <= limits[b].max_partitions
    _check_no_island_can_move(view, result, support, limits, patterns)
    part_of = {n: p.name for p in result.partitions for n in p.nodes}
    for move in result.moves:
        assert move.from_backend != move.to_backend
        assert all(support[move.to_backend][n] is None for n in move.nodes)
        assert {part_of[n] for n in move.nodes} == {move.to_partition}
    # islands only join: every partition formed without a min size (fused patterns included)
    # lies whole inside one partition, and the host keeps exactly the same nodes
    claimed = plan(view, ["x", "y", "z"], support, patterns=patterns,
                   limits={b: Limits(max_partitions=lim.max_partitions) for b, lim in limits.items()})
    assert sorted(claimed.host_nodes) == sorted(result.host_nodes)
    for p in claimed.partitions:
        assert len({part_of[n] for n in p.nodes}) == 1


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
    limits = {b: Limits(min_size=3, max_partitions=len(view.order) // 10) for b in support}
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


def test_islands_join_through_the_pipeline_and_match_eager(sink_plugins):
    import torch

    class Alternating(torch.nn.Module):
        def forward(self, x):
            for _ in range(4):
                x = torch.relu(torch.sin(x))
            return x

    model, x = Alternating(), torch.randn(2, 5)
    opts = {"sink": {"ops": "aten.relu.default"}, "sinkb": {"ops": "aten.sin.default,aten.relu.default"}}
    result = handoff.partition(model, (x,), backends=["sink", "sinkb"], options=opts, fallback=False,
                               limits={"sink": Limits(min_size=2)}, use_cache=False)
    stats = result.report.stats
    assert (stats["sink"].nodes, stats["sinkb"].partitions, stats["sinkb"].nodes) == (0, 1, 8)
    relus = [d for d in result.report.declined if d["op"] == "aten.relu.default"]
    assert len(relus) == 4 and all("joined sinkb_0" in d["reasons"]["sink"] for d in relus)
    with handoff.load(result.to_bytes()) as program:
        got = program.run([x])
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model(x).numpy(), rtol=1e-6)
