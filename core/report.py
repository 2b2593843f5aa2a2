"""The delegation report: where every node went, and why it did not go elsewhere.

Shown as rich tables after ``handoff partition``, written as JSON with ``--report FILE``. Every
node a backend declined is listed with that backend's reason, and every partition moved after a
lowering failure with the compiler's message.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from .partitioner import HOST, GraphView, Plan

OPS_SHOWN = 4  # per backend in the table; the JSON has them all


@dataclasses.dataclass
class BackendStats:
    """One backend's share of the program. ``partitions`` is its number of delegates;
    ``crossings`` the values its delegates receive from or hand to another step (another
    delegate, a host op, the program's inputs and outputs) per run: each is a boundary the
    runtime must carry a value across. ``compile_seconds`` is what its compiler took to make the
    blobs, including blobs the cache supplied in this run (``lower_seconds`` is this run's time)."""

    nodes: int = 0
    partitions: int = 0
    ops: dict[str, int] = dataclasses.field(default_factory=dict)
    lower_seconds: float = 0.0
    compile_seconds: float = 0.0
    blob_bytes: int = 0
    cached_partitions: int = 0
    crossings: int = 0


@dataclasses.dataclass
class Report:
    """What one ``partition`` run did. ``notes`` is the only field plugins may append to."""

    model: str
    backends: list[str]
    total_nodes: int
    stats: dict[str, BackendStats]
    declined: list[dict[str, Any]]
    moves: list[dict[str, Any]]
    notes: list[str] = dataclasses.field(default_factory=list)
    program_bytes: int = 0
    output: str | None = None
    #: seconds per phase: export, capability, plan, lower, write
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    #: small partitions that joined a neighbour's (see :mod:`handoff.partitioner`)
    islands: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: values carried between steps per run (all backends and the host)
    crossings: int = 0
    #: with ``--fallback-copies``: per vendor partition, its tvm copy and its size, or why none
    copies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: for an int8 program: how it was quantized (which backend's quantizer annotated which ops,
    #: calibration, ops left float) and the quantize/dequantize ops each backend runs
    quantization: dict[str, Any] | None = None
    #: what was computed from weights alone and folded into constants before partitioning
    #: (:class:`handoff.fold.Folding`); ``None`` with ``--no-fold``
    folding: dict[str, Any] | None = None

    @classmethod
    def build(cls, model: str, backends: list[str], view: GraphView, plan: Plan, lowered: dict[str, Any],
              moves: list[Any], assembled: Any = None) -> "Report":
        stats: dict[str, BackendStats] = {b: BackendStats() for b in [*backends, HOST]}
        for node in view.order:
            s = stats[plan.assignment[node]]
            s.nodes += 1
            s.ops[view.ops[node]] = s.ops.get(view.ops[node], 0) + 1
        for part in plan.partitions:
            s = stats[part.backend]
            s.partitions += 1
            lp = lowered[part.name]
            s.lower_seconds += lp.seconds
            s.compile_seconds += lp.compile_seconds
            s.blob_bytes += len(lp.lowered.blob)
            s.cached_partitions += int(lp.cached)
            s.crossings += len(lp.inputs) + len(lp.outputs)
        declined = [{"node": n, "op": view.ops[n], "ran_on": plan.assignment[n], "reasons": dict(r)}
                    for n, r in plan.reasons.items() if n in view.ops]
        islands = [dataclasses.asdict(m) for m in getattr(plan, "moves", ())]
        return cls(model=model, backends=list(backends), total_nodes=len(view.order), stats=stats,
                   declined=declined, moves=[dataclasses.asdict(m) for m in moves], islands=islands,
                   crossings=_crossings(assembled.manifest) if assembled is not None else 0)

    def coverage(self, backend: str) -> float:
        """Percentage of compute nodes (getitems excluded) that run on ``backend``."""
        s = self.stats.get(backend)
        return 100.0 * s.nodes / self.total_nodes if s and self.total_nodes else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backends": self.backends,
            "total_nodes": self.total_nodes,
            "program_bytes": self.program_bytes,
            "output": self.output,
            "per_backend": {b: {**dataclasses.asdict(s), "coverage_percent": round(self.coverage(b), 2)}
                            for b, s in self.stats.items()},
            "declined": self.declined,
            "moves": self.moves,
            "islands": self.islands,
            "crossings": self.crossings,
            "fallback_copies": self.copies,
            "quantization": self.quantization,
            "folding": self.folding,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": self.notes,
        }

    def render(self, console: Any) -> None:
        """Print the report as rich tables on ``console``."""
        from rich.table import Table

        table = Table(title=f"Delegation report: {self.model}", title_justify="left")
        for col, just in (("backend", "left"), ("nodes", "right"), ("coverage", "right"), ("delegates", "right"),
                          ("crossings", "right"), ("blob", "right"), ("lowering", "right"), ("ops", "left")):
            table.add_column(col, justify=just, no_wrap=col != "ops")  # type: ignore[arg-type]
        for backend, s in self.stats.items():
            if backend == HOST and not s.nodes:
                continue
            short: collections.Counter[str] = collections.Counter()
            for op, c in s.ops.items():  # aten.add.Tensor -> add: overloads are in the JSON
                short[op.split(".")[1] if op.startswith(("aten.", "quantized_decomposed.")) else op] += c
            top = short.most_common()
            ops = ", ".join(f"{op}×{c}" for op, c in top[:OPS_SHOWN]) + (
                f", +{len(top) - OPS_SHOWN} more" if len(top) > OPS_SHOWN else "")
            lowering = f"{s.lower_seconds:.2f}s" + (f" ({s.cached_partitions} cached, compiled in "
                                                    f"{s.compile_seconds:.2f}s)" if s.cached_partitions else "")
            table.add_row(backend if backend != HOST else "aten (host)", str(s.nodes), f"{self.coverage(backend):.1f}%",
                          str(s.partitions), str(s.crossings) if s.partitions else "-",
                          _size(s.blob_bytes) if s.partitions else "-",
                          lowering if s.partitions else "-", ops or "-")
        console.print(table)
        if self.declined:
            grouped: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = collections.Counter()
            for d in self.declined:
                grouped[(d["op"], d["ran_on"], tuple(d["reasons"].items()))] += 1
            why = Table(title="Declined ops (each backend's reason)", title_justify="left")
            for col in ("op", "count", "ran on", "reasons"):
                why.add_column(col)
            for (op, ran_on, reasons), count in sorted(grouped.items(), key=lambda kv: (-kv[1], kv[0][0])):
                why.add_row(op, str(count), ran_on, "\n".join(f"{b}: {r}" for b, r in reasons))
            console.print(why)
        for move in self.moves:
            console.print(f"[yellow]moved[/] {len(move['nodes'])} node(s) of {move['partition']} off "
                          f"{move['backend']}: {move['reason']}")
        for island in self.islands:
            console.print(f"[cyan]joined[/] {len(island['nodes'])} node(s) from {island['from_backend']} to "
                          f"{island['to_partition']}: {island['reason']}")
        if self.copies:
            cost: collections.Counter[str] = collections.Counter()
            for c in self.copies:
                cost[c["backend"]] += c["bytes"]
            sizes = ", ".join(f"{b} +{_size(n)}" for b, n in cost.items())
            made = sum(c["copy"] is not None for c in self.copies)
            console.print(f"fallback copies: {made} of {len(self.copies)} vendor delegate(s) carry a tvm copy ({sizes})")
            for c in self.copies:
                if c["copy"] is None:
                    console.print(f"[yellow]no copy[/] for {c['partition']} ({c['backend']}): {c['reason']}")
        if self.quantization:
            self._render_quantization(console)
        if self.folding and (self.folding["nodes"] or self.folding["kept"]):
            f = self.folding
            console.print(f"folded {len(f['nodes'])} node(s) computed from weights alone into "
                          f"{len(set(f['constants'].values()))} constant(s) (+{_size(f['added_bytes'])}, "
                          f"-{_size(f['removed_bytes'])} of weights only they read)")
            for k in f["kept"]:
                console.print(f"[yellow]not folded[/] {k['node']} ({k['op']}): {k['reason']}")
        if self.timings:
            phases = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
            console.print(f"{self.crossings} value crossing(s) per run; {phases}")
        for note in self.notes:
            console.print(f"note: {note}")
        if self.output:
            console.print(f"wrote {self.output} ({_size(self.program_bytes)})")


    def _render_quantization(self, console: Any) -> None:
        q = self.quantization or {}
        console.print(f"{q.get('scheme', 'int8')}: calibration {q.get('calibration')}")
        for backend, ops in q.get("annotated_by", {}).items():
            shown = ", ".join(f"{op.split('.')[1] if op.startswith('aten.') else op}×{c}"
                              for op, c in sorted(ops.items(), key=lambda kv: -kv[1])) or "nothing"
            console.print(f"  {backend}'s quantizer annotated: {shown}")
        if q.get("float_ops"):
            left = sum(q["float_ops"].values())
            console.print(f"  {left} op(s) no quantizer annotated stay float: "
                          + ", ".join(f"{op.split('.')[1] if op.startswith('aten.') else op}×{c}"
                                      for op, c in sorted(q["float_ops"].items(), key=lambda kv: -kv[1])))
        for backend, entry in q.get("backends", {}).items():
            where = "aten (host)" if backend == HOST else backend
            how = f" ({'; '.join(entry['compute'])})" if entry.get("compute") else ""
            console.print(f"  {where} runs {entry['qdq_ops']} quantize/dequantize op(s){how}")


def _crossings(manifest: dict[str, Any]) -> int:
    """Values carried from one step (or the program's input) to another step (or the program's
    output) per run: every read of a value made elsewhere, and every output."""
    constants = {c["value"] for c in manifest["constants"]}
    reads = 0
    for ins in manifest["instructions"]:
        vids = ins["inputs"] if ins["op"] == "delegate" else _value_reads([ins["args"], list(ins["kwargs"].values())])
        reads += sum(v not in constants for v in vids)
    return reads + len(manifest["outputs"])


def _value_reads(args: Any) -> list[int]:
    if isinstance(args, list):
        return [v for a in args for v in _value_reads(a)]
    if isinstance(args, dict) and "value" in args:
        return [args["value"]]
    return []


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
