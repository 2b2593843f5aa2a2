"""Step 2: the priority partitioner.

Backends claim nodes in priority order: the first backend forms partitions from the nodes it
supports, the next one from what is left, and so on (the built-in ``tvm`` backend last, unless
``--no-fallback``). What nobody claims runs on the host as ATen ops, unless ``--no-aten``.

Partitions are kept acyclic *globally*: contracting every partition (and every remaining node) to
one vertex must leave a DAG, otherwise two delegates could each need the other's output. Two
groups may merge only when no path leaves one and re-enters the other through a third group. The
planner works on an abstract DAG (:class:`GraphView`) so the property tests can drive it without
torch; :func:`graph_view` builds one from an ``ExportedProgram``.
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
from typing import Any, Mapping, Sequence

from .errors import HandoffError

#: Pseudo-backend id for nodes left to the host (ATen ops run through torch at run time).
HOST = "aten"


@dataclasses.dataclass
class GraphView:
    """A DAG of compute nodes in topological order.

    :param order: compute node names in topological order (``getitem`` nodes excluded).
    :param preds: node -> compute nodes it reads (through ``getitem`` nodes, resolved).
    :param ops: node -> op name for messages ("aten.cumsum.default").
    :param getitems: ``getitem`` node -> the multi-output node it reads.
    """

    order: list[str]
    preds: dict[str, list[str]]
    ops: dict[str, str]
    getitems: dict[str, str] = dataclasses.field(default_factory=dict)

    def label(self, node: str) -> str:
        return f"{node} ({self.ops.get(node, '?')})"


@dataclasses.dataclass
class Partition:
    """Nodes claimed by one backend that run as one delegate call."""

    backend: str
    name: str
    nodes: list[str]  # topological order, getitem nodes included


@dataclasses.dataclass
class Plan:
    """The partitioner's answer.

    :param assignment: every compute and getitem node -> backend id or :data:`HOST`.
    :param steps: execution order: :class:`Partition` objects and host node names.
    :param reasons: node -> backend -> why that backend did not take it (declined, released
        for size limits, excluded after a lowering failure).
    """

    assignment: dict[str, str]
    partitions: list[Partition]
    steps: list[Partition | str]
    reasons: dict[str, dict[str, str]]

    @property
    def host_nodes(self) -> list[str]:
        return [s for s in self.steps if isinstance(s, str)]


@dataclasses.dataclass
class Limits:
    """Per-backend partition limits (``--min-partition-size``, ``--max-partitions``)."""

    min_size: int = 1
    max_partitions: int | None = None


class _Groups:
    """Disjoint groups of nodes with the acyclicity check on the contracted graph."""

    def __init__(self, view: GraphView):
        self.index = {n: i for i, n in enumerate(view.order)}
        self.succs: dict[str, list[str]] = {n: [] for n in view.order}
        for n in view.order:
            for p in view.preds[n]:
                self.succs[p].append(n)
        self.group = {n: n for n in view.order}
        self.members = {n: [n] for n in view.order}
        self.lo = {n: self.index[n] for n in view.order}

    def succ_groups(self, g: str) -> set[str]:
        return {self.group[c] for m in self.members[g] for c in self.succs[m]} - {g}

    def _reaches_via_other(self, a: str, b: str) -> bool:
        """Whether a path a -> X -> ... -> b exists with X outside {a, b}.

        No pruning by topological index: a merged group can hold both early and late nodes, so a
        late group may still reach ``b`` through it."""
        stack = [g for g in self.succ_groups(a) if g != b]
        seen = set(stack)
        while stack:
            for nxt in self.succ_groups(stack.pop()):
                if nxt == b:
                    return True
                if nxt not in seen and nxt != a:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    def try_merge(self, a: str, b: str) -> bool:
        a, b = self.group[a], self.group[b]
        if a == b:
            return True
        if self._reaches_via_other(a, b) or self._reaches_via_other(b, a):
            return False
        if len(self.members[a]) < len(self.members[b]):
            a, b = b, a
        for m in self.members.pop(b):
            self.group[m] = a
            self.members[a].append(m)
        self.lo[a] = min(self.lo[a], self.lo.pop(b))
        return True

    def split(self, g: str) -> None:
        """Undo every merge into ``g`` (always keeps the contracted graph acyclic)."""
        for m in self.members.pop(g):
            self.group[m] = m
            self.members[m] = [m]
            self.lo[m] = self.index[m]

    def topo_groups(self) -> list[str]:
        indeg = {g: 0 for g in self.members}
        for g in self.members:
            for s in self.succ_groups(g):
                indeg[s] += 1
        heap = [(self.lo[g], g) for g, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        out = []
        while heap:
            _, g = heapq.heappop(heap)
            out.append(g)
            for s in self.succ_groups(g):
                indeg[s] -= 1
                if indeg[s] == 0:
                    heapq.heappush(heap, (self.lo[s], s))
        if len(out) != len(self.members):  # the merge rule makes this unreachable
            raise AssertionError("partitioner produced a cycle between partitions")
        return out


def plan(view: GraphView, backends: Sequence[str], support: Mapping[str, Mapping[str, str | None]],
         patterns: Mapping[str, Sequence[Sequence[str]]] | None = None,
         limits: Mapping[str, Limits] | None = None, allow_host: bool = True,
         excluded: Mapping[str, Mapping[str, str]] | None = None, no_host_reason: str = "--no-aten") -> Plan:
    """Assign every node of ``view`` to one of ``backends`` (priority order) or the host.

    :param support: backend -> node -> ``None`` (supported) or the reason it is declined.
    :param patterns: backend -> node groups that must share one partition or stay unclaimed.
    :param excluded: node -> backend -> reason, for nodes a backend must not take (a lowering
        failure moved them away).
    :raises HandoffError: when nodes remain and ``allow_host`` is false, listing each with every
        backend's reason.
    """
    groups = _Groups(view)
    owner: dict[str, str] = {}  # node -> backend, for committed nodes
    reasons: dict[str, dict[str, str]] = {n: {} for n in view.order}
    for node, per_backend in (excluded or {}).items():
        if node in reasons:
            reasons[node].update(per_backend)
    for backend in backends:
        _claim(view, groups, owner, reasons, backend, support.get(backend, {}),
               (patterns or {}).get(backend, ()), (limits or {}).get(backend, Limits()), excluded or {})

    leftover = [n for n in view.order if n not in owner]
    if leftover and not allow_host:
        details = "; ".join(f"{view.label(n)}: " + (", ".join(f"{b}: {r}" for b, r in reasons[n].items()) or "no backend tried")
                            for n in leftover)
        raise HandoffError(f"{len(leftover)} node(s) not claimed by any backend ({no_host_reason}): {details}")
    for n in leftover:
        owner[n] = HOST

    steps: list[Partition | str] = []
    partitions: list[Partition] = []
    counters: dict[str, int] = {}
    for g in groups.topo_groups():
        backend = owner[g]
        if backend == HOST:
            steps.append(g)
            continue
        name = f"{backend}_{counters.setdefault(backend, 0)}"
        counters[backend] += 1
        nodes = sorted(groups.members[g], key=groups.index.__getitem__)
        part = Partition(backend, name, _with_getitems(nodes, view))
        partitions.append(part)
        steps.append(part)
    assignment = dict(owner)
    for item, producer in view.getitems.items():
        assignment[item] = owner[producer]
    return Plan(assignment, partitions, steps, {n: r for n, r in reasons.items() if r})


def _with_getitems(nodes: list[str], view: GraphView) -> list[str]:
    by_producer: dict[str, list[str]] = {}
    for item, producer in view.getitems.items():
        by_producer.setdefault(producer, []).append(item)
    out = []
    for n in nodes:
        out.append(n)
        out.extend(by_producer.get(n, ()))
    return out


def _claim(view: GraphView, groups: _Groups, owner: dict[str, str], reasons: dict[str, dict[str, str]],
           backend: str, support: Mapping[str, str | None], patterns: Sequence[Sequence[str]],
           limits: Limits, excluded: Mapping[str, Mapping[str, str]]) -> None:
    candidates: set[str] = set()
    for n in view.order:
        if n in owner:
            continue
        if backend in excluded.get(n, {}):
            continue
        reason = support.get(n, "not reported by the backend's capability check")
        if reason is None:
            candidates.add(n)
        else:
            reasons[n][backend] = reason
    for pattern in patterns:
        members = [m for m in pattern if m in groups.index]
        bad = [m for m in members if m not in candidates]
        if bad:
            for m in members:
                if m in candidates:
                    candidates.discard(m)
                    reasons[m][backend] = f"fused pattern with {view.label(bad[0])}, which {backend} does not take"
            continue
        for m in members[1:]:
            groups.try_merge(members[0], m)

    for n in view.order:  # grow partitions along data edges, in topological order
        if n in candidates:
            for p in view.preds[n]:
                if p in candidates:
                    groups.try_merge(p, n)

    mine = {groups.group[n] for n in candidates}
    ranked = sorted(mine, key=lambda g: (-len(groups.members[g]), groups.lo[g]))
    for rank, g in enumerate(ranked):
        size = len(groups.members[g])
        if size < limits.min_size:
            why = f"its partition has {size} node(s), below --min-partition-size {limits.min_size}"
        elif limits.max_partitions is not None and rank >= limits.max_partitions:
            why = f"its partition is beyond --max-partitions {limits.max_partitions} (largest kept)"
        else:
            for m in groups.members[g]:
                owner[m] = backend
            continue
        for m in groups.members[g]:
            reasons[m][backend] = why
        groups.split(g)


def graph_view(ep: Any) -> GraphView:
    """The :class:`GraphView` of an ``ExportedProgram``'s call_function nodes."""
    order, preds, ops, getitems = [], {}, {}, {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            getitems[node.name] = node.args[0].name
            continue
        order.append(node.name)
        ops[node.name] = op_name(node.target)
        ps: list[str] = []
        for inp in node.all_input_nodes:
            if inp.op != "call_function":
                continue
            src = getitems.get(inp.name, inp.name)
            if src not in ps:
                ps.append(src)
        preds[node.name] = ps
    return GraphView(order, preds, ops, getitems)


def op_name(target: Any) -> str:
    """``aten.cumsum.default`` for an OpOverload, the qualified name for other callables."""
    name = getattr(target, "name", None)
    if callable(name):  # OpOverload.name() -> "aten::cumsum"; str() gives the dotted form
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}".lstrip(".")
