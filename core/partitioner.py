"""Step 2: the priority partitioner.

Backends claim nodes in priority order: the first backend forms partitions from the nodes it
supports, the next one from what is left, and so on (the built-in ``tvm`` backend last, unless
``--no-fallback``). A backend keeps at most ``--max-partitions`` of its partitions (the largest);
the nodes of the others are released to the next backend. What nobody claims runs on the host as
ATen ops, unless ``--no-aten``.

Islands. Every partition boundary costs a host round trip, so once every backend has claimed, a
partition of backend B smaller than B's ``--min-partition-size`` (an *island*) joins an adjacent
partition (one that feeds it or that it feeds) of another backend B' when B' supports every node
of the island (and no lowering failure excluded B' from one), no fused pattern of B' would be
split, and the contracted graph stays acyclic; the largest such neighbour is preferred. Partitions
of B' that the join made mergeable (B' on both sides of the island) then merge too, and the rule
repeats until nothing changes. An island no neighbour can take stays on B: priority is kept, as
standing alone on B beats standing alone elsewhere; the host never takes an island. Each join is
recorded in :attr:`Plan.moves` and in the island nodes' reasons.

Partitions are kept acyclic *globally*: contracting every partition (and every remaining node) to
one vertex must leave a DAG, otherwise two delegates could each need the other's output. Two
groups may merge only when no path leaves one and re-enters the other through a third group.
:class:`_Groups` keeps that check near-linear in the graph size: group adjacency is maintained
incrementally, and topological labels bound each reachability search (see its docstring). The
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
class IslandMove:
    """An island (a partition below its backend's ``--min-partition-size``) that joined an
    adjacent partition of another backend.

    :param nodes: the island's compute nodes, in topological order.
    :param from_backend: the backend that claimed them.
    :param to_backend: the backend whose partition they joined.
    :param to_partition: the partition that holds them in the plan; one of ``to_backend``'s,
        unless the group they joined was an island itself and moved on (a later move says where).
    :param reason: why ``from_backend`` does not run them, as in :attr:`Plan.reasons`.
    """

    nodes: list[str]
    from_backend: str
    to_backend: str
    to_partition: str = ""
    reason: str = ""


@dataclasses.dataclass
class Plan:
    """The partitioner's answer.

    :param assignment: every compute and getitem node -> backend id or :data:`HOST`.
    :param steps: execution order: :class:`Partition` objects and host node names.
    :param reasons: node -> backend -> why that backend did not take it (declined, released
        for size limits, joined another backend's partition as an island, excluded after a
        lowering failure).
    :param moves: the islands that joined another backend's partition, in the order they moved.
    """

    assignment: dict[str, str]
    partitions: list[Partition]
    steps: list[Partition | str]
    reasons: dict[str, dict[str, str]]
    moves: list[IslandMove] = dataclasses.field(default_factory=list)

    @property
    def host_nodes(self) -> list[str]:
        return [s for s in self.steps if isinstance(s, str)]


@dataclasses.dataclass
class Limits:
    """Per-backend partition limits.

    :param min_size: ``--min-partition-size``: a smaller partition is an island that joins a
        neighbouring partition of another backend when one can take it (module docstring).
    :param max_partitions: ``--max-partitions``: the largest are kept, the others' nodes released
        to the next backend.
    """

    min_size: int = 1
    max_partitions: int | None = None


class _Groups:
    """Disjoint groups of nodes with the acyclicity check on the contracted graph.

    A group is named by one of its nodes. ``out``/``inn`` hold each group's successor and
    predecessor groups and are updated on every merge and split, never recomputed from members.

    Every group carries an integer ``label`` with the invariant "an edge g -> h implies
    label[g] < label[h]" (initially the topological index times :attr:`SPACING`). Merging a and b
    with label[a] <= label[b] is refused when a path a -> X -> ... -> b exists with X outside
    {a, b}; such a path only visits labels between the two (no path b -> a can exist), so two
    searches bounded by that window run in turns, down from a and up from b, and stop when they
    meet (refused) or when one runs out. The exhausted side is what must move: when it is a's
    descendants in the window, the merged group takes label[b] and they move, in their order, just
    above it; when it is b's ancestors, the merged group takes label[a] and they move just below.
    Either way the work is at most twice the smaller side, which keeps growing a partition past a
    long side branch cheap. When a gap is too narrow every group is relabelled at once
    (:meth:`relabel`, rare). Still quadratic in one case: many refusals that each prove a long path
    (one node feeding every layer of a long stack that another backend runs) walk it anew.

    ``visits`` and ``relabels`` count the groups the searches expanded and the global
    relabellings, so tests can check that the work stays linear.
    """

    #: Gap between initial labels: room for ~32 nested re-placements before a global relabel.
    SPACING = 1 << 32

    def __init__(self, view: GraphView):
        self.index = {n: i for i, n in enumerate(view.order)}
        self.succs: dict[str, list[str]] = {n: [] for n in view.order}
        for n in view.order:
            for p in view.preds[n]:
                self.succs[p].append(n)
        self.preds = view.preds
        self.group = {n: n for n in view.order}
        self.members = {n: [n] for n in view.order}
        self.lo = dict(self.index)
        self.out = {n: set(self.succs[n]) for n in view.order}
        self.inn = {n: set(view.preds[n]) for n in view.order}
        self.label = {n: i * self.SPACING for n, i in self.index.items()}
        self.visits = 0
        self.relabels = 0

    def _weight(self, g: str) -> int:
        return len(self.members[g]) + len(self.out[g]) + len(self.inn[g])

    def neighbours(self, g: str) -> set[str]:
        return self.out[g] | self.inn[g]

    def _search(self, a: str, b: str) -> tuple[bool, set[str]] | None:
        """``None`` when a path a -> X -> ... -> b exists with X outside {a, b} (label[a] <=
        label[b]); otherwise ``(True, D)`` with D every descendant of a labelled up to label[b],
        or ``(False, A)`` with A every ancestor of b labelled from label[a] on, whichever search
        finished first. Labels tie only across unrelated groups; a tie is inside the window."""
        lo, hi = self.label[a], self.label[b]
        down = [x for x in self.out[a] if x != b and self.label[x] <= hi]
        up = [x for x in self.inn[b] if x != a and self.label[x] >= lo]
        below, above = set(down), set(up)  # reached from a, reaching b
        if below & above:
            return None
        while down and up:
            x = down.pop()
            self.visits += 1
            for y in self.out[x]:
                if y == b or y in above:
                    return None
                if y not in below and self.label[y] <= hi:
                    below.add(y)
                    down.append(y)
            x = up.pop()
            self.visits += 1
            for y in self.inn[x]:
                if y == a or y in below:
                    return None
                if y not in above and self.label[y] >= lo:
                    above.add(y)
                    up.append(y)
        return (True, below) if not down else (False, above)

    def try_merge(self, a: str, b: str) -> bool:
        """Merge the groups of ``a`` and ``b`` unless that would make the contracted graph cyclic."""
        a, b = self.group[a], self.group[b]
        if a == b:
            return True
        if self.label[a] > self.label[b]:
            a, b = b, a
        found = self._search(a, b)
        if found is None:
            return False
        descendants, moving = found
        label = self.label[b] if descendants else self.label[a]
        # the heavier group keeps its name; the lighter one's members and adjacency move into it
        keep, gone = (a, b) if self._weight(a) >= self._weight(b) else (b, a)
        for m in self.members.pop(gone):
            self.group[m] = keep
            self.members[keep].append(m)
        for x in self.out.pop(gone):
            if x != keep:
                self.inn[x].discard(gone)
                self.inn[x].add(keep)
                self.out[keep].add(x)
        for x in self.inn.pop(gone):
            if x != keep:
                self.out[x].discard(gone)
                self.out[x].add(keep)
                self.inn[keep].add(x)
        self.out[keep].discard(gone)
        self.inn[keep].discard(gone)
        self.lo[keep] = min(self.lo[keep], self.lo.pop(gone))
        del self.label[gone]
        self.label[keep] = label
        if moving and descendants:  # between the merged group and their lowest other successor
            room = (self.label[s] for g in moving for s in self.out[g] if s not in moving)
            self._place(moving, label, min(room, default=label + (len(moving) + 1) * self.SPACING))
        elif moving:  # between their highest other predecessor and the merged group
            room = (self.label[p] for g in moving for p in self.inn[g] if p not in moving)
            self._place(moving, max(room, default=label - (len(moving) + 1) * self.SPACING), label)
        return True

    def _place(self, moving: set[str], floor: int, ceiling: int) -> None:
        """Relabel ``moving`` strictly between ``floor`` and ``ceiling``, keeping its order."""
        step = (ceiling - floor) // (len(moving) + 1)
        if step == 0:
            self.relabel()
            return
        for i, g in enumerate(sorted(moving, key=self.label.__getitem__), 1):
            self.label[g] = floor + i * step

    def relabel(self) -> None:
        """Label every group by its position in :meth:`topo_groups` (Kahn's algorithm, O(N + E))."""
        self.relabels += 1
        for i, g in enumerate(self.topo_groups()):
            self.label[g] = i * self.SPACING

    def split(self, gs: Sequence[str]) -> None:
        """Undo every merge into each group of ``gs`` (always keeps the contracted graph acyclic)."""
        for g in gs:
            for x in self.out.pop(g):
                self.inn[x].discard(g)
            for x in self.inn.pop(g):
                self.out[x].discard(g)
            members = self.members.pop(g)
            for m in members:
                self.group[m] = m
                self.members[m] = [m]
                self.lo[m] = self.index[m]
            for m in members:
                self.out[m] = {self.group[s] for s in self.succs[m]}
                self.inn[m] = {self.group[p] for p in self.preds[m]}
            inside = set(members)  # their sets are complete already
            for m in members:
                for x in self.out[m] - inside:
                    self.inn[x].add(m)
                for x in self.inn[m] - inside:
                    self.out[x].add(m)
        if gs:  # the members' labels are stale: the merged group had one label for them all
            self.relabel()

    def topo_groups(self) -> list[str]:
        """Groups in a deterministic topological order (ties: the lowest member index first)."""
        indeg = {g: len(self.inn[g]) for g in self.members}
        heap = [(self.lo[g], g) for g, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        out = []
        while heap:
            _, g = heapq.heappop(heap)
            out.append(g)
            for s in self.out[g]:
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
    :param limits: backend -> :class:`Limits`; backends not named get ``Limits()``.
    :param excluded: node -> backend -> reason, for nodes a backend must not take (a lowering
        failure moved them away).
    :raises HandoffError: when nodes remain and ``allow_host`` is false, listing each with every
        backend's reason.
    """
    patterns, excluded = patterns or {}, excluded or {}
    limits = {b: (limits or {}).get(b, Limits()) for b in backends}
    groups = _Groups(view)
    owner: dict[str, str] = {}  # node -> backend, for committed nodes
    reasons: dict[str, dict[str, str]] = {n: {} for n in view.order}
    for node, per_backend in excluded.items():
        if node in reasons:
            reasons[node].update(per_backend)
    for backend in backends:
        _claim(view, groups, owner, reasons, backend, support.get(backend, {}), patterns.get(backend, ()),
               limits[backend], excluded)
    moves = _join_islands(groups, owner, support, patterns, limits, excluded)

    leftover = [n for n in view.order if n not in owner]
    if leftover and not allow_host:
        details = "; ".join(f"{view.label(n)}: " + (", ".join(f"{b}: {r}" for b, r in reasons[n].items()) or "no backend tried")
                            for n in leftover)
        raise HandoffError(f"{len(leftover)} node(s) not claimed by any backend ({no_host_reason}): {details}")
    for n in leftover:
        owner[n] = HOST

    items_of: dict[str, list[str]] = {}  # multi-output node -> its getitem nodes
    for item, producer in view.getitems.items():
        items_of.setdefault(producer, []).append(item)
    steps: list[Partition | str] = []
    partitions: list[Partition] = []
    names: dict[str, str] = {}  # group -> partition name
    counters: dict[str, int] = {}
    for g in groups.topo_groups():
        backend = owner[g]
        if backend == HOST:
            steps.append(g)
            continue
        names[g] = f"{backend}_{counters.setdefault(backend, 0)}"
        counters[backend] += 1
        nodes = [m for n in sorted(groups.members[g], key=groups.index.__getitem__) for m in (n, *items_of.get(n, ()))]
        part = Partition(backend, names[g], nodes)
        partitions.append(part)
        steps.append(part)
    for move in moves:  # names exist only now; a later move may overwrite a reason (see IslandMove)
        move.to_partition = names[groups.group[move.nodes[0]]]
        move.reason = (f"island of {len(move.nodes)} node(s) below --min-partition-size "
                       f"{limits[move.from_backend].min_size} joined {move.to_partition}, which also takes it")
        for n in move.nodes:
            reasons[n][move.from_backend] = move.reason
            reasons[n].pop(move.to_backend, None)  # e.g. released earlier for --max-partitions
    assignment = dict(owner)
    for item, producer in view.getitems.items():
        assignment[item] = owner[producer]
    return Plan(assignment, partitions, steps, {n: r for n, r in reasons.items() if r}, moves)


def _claim(view: GraphView, groups: _Groups, owner: dict[str, str], reasons: dict[str, dict[str, str]],
           backend: str, support: Mapping[str, str | None], patterns: Sequence[Sequence[str]],
           limits: Limits, excluded: Mapping[str, Mapping[str, str]]) -> None:
    """``backend`` forms partitions from the unowned nodes it supports and keeps the largest
    ``limits.max_partitions`` of them; size below ``limits.min_size`` is left to :func:`_join_islands`."""
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
    kept = len(ranked) if limits.max_partitions is None else limits.max_partitions
    for g in ranked[:kept]:
        for m in groups.members[g]:
            owner[m] = backend
    why = f"its partition is beyond --max-partitions {limits.max_partitions} (largest kept)"
    for g in ranked[kept:]:
        for m in groups.members[g]:
            reasons[m][backend] = why
    groups.split(ranked[kept:])


def _join_islands(groups: _Groups, owner: dict[str, str], support: Mapping[str, Mapping[str, str | None]],
                  patterns: Mapping[str, Sequence[Sequence[str]]], limits: Mapping[str, Limits],
                  excluded: Mapping[str, Mapping[str, str]]) -> list[IslandMove]:
    """Apply the island rule of the module docstring to the claimed groups (``owner`` is updated);
    returns the moves in the order made, their partition names and reasons still empty.

    A worklist, lowest first member first. A failed island is queued again only when a merge
    changes the group or one of its neighbours: merges never remove a path, so nothing else can
    make a refused join possible, and each merge queues only the merged group's neighbours."""
    in_patterns: dict[str, dict[str, list[Sequence[str]]]] = {}  # backend -> node -> its patterns
    for backend, pats in patterns.items():
        for pattern in pats:
            for m in pattern:
                in_patterns.setdefault(backend, {}).setdefault(m, []).append(pattern)

    def is_island(g: str) -> bool:
        backend = owner.get(g)  # a group is named by one of its nodes; all share the owner
        return backend is not None and len(groups.members[g]) < limits[backend].min_size

    def takes(target: str, island: str) -> bool:
        to = owner.get(target)
        if to is None or to == owner[island]:
            return False
        for n in groups.members[island]:
            if support.get(to, {}).get(n, "") is not None or to in excluded.get(n, {}):
                return False
            for pattern in in_patterns.get(to, {}).get(n, ()):  # it must end whole in the join
                if any(m in groups.group and groups.group[m] not in (island, target) for m in pattern):
                    return False
        return True

    moves: list[IslandMove] = []
    work = [(groups.lo[g], g) for g in groups.members if is_island(g)]
    heapq.heapify(work)
    while work:
        _, island = heapq.heappop(work)
        if island not in groups.members or not is_island(island):
            continue  # merged away, or grown since it was queued
        targets = sorted((t for t in groups.neighbours(island) if takes(t, island)),
                         key=lambda t: (-len(groups.members[t]), groups.lo[t]))
        for target in targets:
            nodes, from_backend, to = list(groups.members[island]), owner[island], owner[target]
            if not groups.try_merge(island, target):
                continue
            for n in nodes:
                owner[n] = to
            moves.append(IslandMove(sorted(nodes, key=groups.index.__getitem__), from_backend, to))
            merged = _merge_same_backend(groups, owner, groups.group[target])
            for g in (merged, *groups.neighbours(merged)):
                if is_island(g):
                    heapq.heappush(work, (groups.lo[g], g))
            break
    return moves


def _merge_same_backend(groups: _Groups, owner: Mapping[str, str], g: str) -> str:
    """Merge ``g`` with every adjacent group of its backend that it can take without a cycle;
    returns the merged group."""
    backend = owner[g]
    merged = True
    while merged:
        merged = False
        for t in sorted(groups.neighbours(g), key=groups.lo.__getitem__):
            # t may have been merged into g earlier in this pass
            if t in groups.members and owner.get(t) == backend and groups.try_merge(g, t):
                g, merged = groups.group[g], True
    return g


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
