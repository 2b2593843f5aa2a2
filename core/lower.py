"""Step 3: cut each partition out as its own ``ExportedProgram``, lower it with its backend's
compiler, and assemble the program (manifest + segments) with host ATen ops in between.

A partition that fails to lower either stops the run (the default) or, with
``on_lower_error="fallback"``, is excluded from that backend and the graph is partitioned again,
so the next backend in the list (then ``tvm``, then the host) takes those nodes; the report lists
every such move with the compiler's message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import time
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import __version__
from .backend import Lowered, LoweringError
from .cache import LoweringCache
from .errors import HandoffError
from .export import quiet_torch
from .fold import weight_tensors
from .partitioner import HOST, Partition, Plan, op_name
from .program import DTYPES, FORMAT_MAJOR, FORMAT_MINOR

PROBE_LIMIT = 64  # nodes tried one by one to find the first failing op of a failed partition


@dataclasses.dataclass
class LoweredPartition:
    partition: Partition
    lowered: Lowered
    seconds: float  # spent lowering it in this run (about 0 when cached)
    cached: bool
    inputs: list[Any]  # fx nodes feeding the partition, in delegate input order
    outputs: list[Any]  # fx nodes it produces for others, in delegate output order
    compile_seconds: float = 0.0  # what the backend's compiler took when it made the blob


@dataclasses.dataclass
class Move:
    """Nodes moved off a backend because their partition failed to lower."""

    backend: str
    partition: str
    nodes: list[str]
    reason: str


def dtype_name(dtype: Any, where: str) -> str:
    """The program dtype of a torch dtype: the same name (``torch.uint16`` -> ``uint16``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise HandoffError(f"{where}: dtype {name} is not supported by program format "
                           f"{FORMAT_MAJOR}.{FORMAT_MINOR} (supported: {', '.join(DTYPES)}); cast it in the model")
    return name


def _tensor_bytes(t: Any) -> bytes:
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def partition_io(ep: Any, names: Sequence[str]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """The fx nodes of the partition ``names`` of ``ep`` (in graph order), the values flowing in
    from outside (model inputs, other partitions, host ops), the weights they use, and the nodes
    whose values are used outside, without exporting anything."""
    inside = set(names)
    nodes = [n for n in ep.graph.nodes if n.name in inside]
    weights = weight_tensors(ep)
    external: list[Any] = []
    used_weights: list[Any] = []
    for n in nodes:
        for inp in n.all_input_nodes:
            if inp.name in inside:
                continue
            bucket = used_weights if inp.name in weights else external
            if inp not in bucket:
                bucket.append(inp)
    outputs = [n for n in nodes if any(u.name not in inside for u in n.users)]
    return nodes, external, used_weights, outputs


def extract_partition(ep: Any, names: Sequence[str],
                      decomp_table: Mapping[Any, Any] | None = None) -> tuple[Any, list[Any], list[Any]]:
    """Cut the nodes ``names`` of ``ep`` out into an ``ExportedProgram`` of their own: what
    :meth:`handoff.Compiler.preprocess` receives for a partition. Public API: a backend's
    :meth:`~handoff.Compiler.check_partition` uses it to test-compile a candidate group.

    Its user inputs are the values flowing in from outside (model inputs, other partitions, host
    ops), its parameters/buffers are the weights the nodes use, its outputs the values used
    outside. ``decomp_table`` (default: none) decomposes any of the nodes' ops it lists. Returns
    ``(sub_ep, input_nodes, output_nodes)`` with nodes of ``ep.graph``.
    """
    import torch
    import torch.fx
    from torch.export import ExportedProgram
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                              TensorArgument)
    from torch.utils import _pytree

    nodes, external, used_weights, outputs = partition_io(ep, names)
    weights = weight_tensors(ep)
    graph = torch.fx.Graph()
    env: dict[Any, Any] = {}
    specs: list[Any] = []
    state_dict: dict[str, Any] = {}
    constants: dict[str, Any] = {}

    def placeholder(node: Any, name: str) -> Any:
        env[node] = graph.placeholder(name)
        env[node].meta["val"] = node.meta["val"]
        return env[node].name

    # Weights first, then user inputs: the placeholder order torch.export itself produces.
    for i, inp in enumerate(used_weights):
        kind, tensor = weights[inp.name]
        target = f"w{i}_{inp.name}"
        arg = TensorArgument(placeholder(inp, f"p_{target}"))
        if kind == "parameter":
            state_dict[target] = torch.nn.Parameter(tensor.detach(), requires_grad=False)
            specs.append(InputSpec(InputKind.PARAMETER, arg, target))
        elif kind == "buffer":
            state_dict[target] = tensor.detach()
            specs.append(InputSpec(InputKind.BUFFER, arg, target, persistent=True))
        else:
            constants[target] = tensor.detach()
            specs.append(InputSpec(InputKind.CONSTANT_TENSOR, arg, target))
    for i, inp in enumerate(external):
        specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(placeholder(inp, f"input_{i}")), None))
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in outputs))
    _propagate_contiguous(graph, [(inp, weights[inp.name][1]) for inp in used_weights] + [(inp, None) for inp in external])
    out_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(env[o].name), None) for o in outputs]
    example = tuple(torch.zeros(tuple(i.meta["val"].shape), dtype=i.meta["val"].dtype) for i in external)
    call = ModuleCallSignature(inputs=[], outputs=[], in_spec=_pytree.tree_flatten((example, {}))[1],
                               out_spec=_pytree.tree_flatten(tuple(outputs))[1])
    # The nodes are already core ATen (decomposed once, with the same table, in export_model), so
    # the program is assembled from them directly: re-tracing with torch.export would cost as much
    # as exporting the model again. ``decomp_table`` applies only ops it lists beyond that.
    sub = ExportedProgram(root=torch.nn.Module(), graph=graph,
                          graph_signature=ExportGraphSignature(specs, out_specs), state_dict=state_dict,
                          range_constraints={}, module_call_graph=[ModuleCallEntry("", call)],
                          example_inputs=(example, {}), constants=constants)
    if decomp_table and any(n.target in decomp_table for n in graph.nodes if n.op == "call_function"):
        with torch.no_grad(), quiet_torch():
            sub = sub.run_decompositions(dict(decomp_table))
    else:  # a re-traced program is no longer the parent's nodes: it has no source to reuse work from
        _SOURCES[sub] = PartitionSource(ep, tuple(n.name for n in nodes), _is_whole(ep, nodes, external, outputs))
    return sub, external, outputs


@dataclasses.dataclass(frozen=True)
class PartitionSource:
    """What a program made by :func:`extract_partition` was cut from: see :func:`partition_source`.

    :param program: the ``ExportedProgram`` it was cut from. In a ``partition`` run this is the
        very object the backend's :meth:`~handoff.Compiler.support` received, unchanged since.
    :param nodes: the names of the nodes of ``program`` it holds, in graph order.
    :param whole: it computes what ``program`` computes: it holds every ``call_function`` node,
        its user inputs and outputs are ``program``'s in the same order, and ``program`` mutates
        no buffer or input. Only names differ (weights are ``p_w0_...``, inputs ``input_0``...),
        and weights no node reads are left out. A backend's verdicts on ``program``'s nodes then
        hold for it, and a conversion of another cut of the same nodes (``extract_partition(program,
        nodes)`` again) is of the same program: cuts are deterministic.
    """

    program: Any
    nodes: tuple[str, ...]
    whole: bool


#: extracted program -> its source; weak, so the record goes with the program
_SOURCES: "weakref.WeakKeyDictionary[Any, PartitionSource]" = weakref.WeakKeyDictionary()


def partition_source(ep: Any) -> PartitionSource | None:
    """The source of ``ep`` when :func:`extract_partition` made it (and decomposed nothing
    further), else ``None``. Public API: what :meth:`handoff.Compiler.preprocess` may reuse from
    its :meth:`~handoff.Compiler.support` on the whole program, the way ExecuTorch's ``to_backend``
    lowers the partitions of the very program its partitioner tagged (docs/plugins.md)."""
    return _SOURCES.get(ep)


def _is_whole(ep: Any, nodes: Sequence[Any], external: Sequence[Any], outputs: Sequence[Any]) -> bool:
    """Whether the cut of ``nodes`` is ``ep`` itself (:attr:`PartitionSource.whole`)."""
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        return False
    if any(s.kind is not OutputKind.USER_OUTPUT or not isinstance(s.arg, TensorArgument) for s in sig.output_specs):
        return False
    user_inputs = [s.arg.name if isinstance(s.arg, TensorArgument) else None
                   for s in sig.input_specs if s.kind is InputKind.USER_INPUT]
    computing = {n.name for n in ep.graph.nodes if n.op == "call_function"}
    return ({n.name for n in nodes} == computing and user_inputs == [n.name for n in external]
            and [s.arg.name for s in sig.output_specs] == [n.name for n in outputs])


def _propagate_contiguous(graph: Any, placeholders: Sequence[tuple[Any, Any]]) -> None:
    """Recompute every value's fake tensor in ``graph`` with contiguous inputs. In the parent an
    input of the partition may be a strided view (a transpose feeding a matmul); the partition
    receives a dense array at run time, and a compiler that plans memory from the strides
    (ExecuTorch's dim order) must see that. ``placeholders``: (parent node, weight tensor or None)
    in the graph's placeholder order."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode()
    fakes = []
    for node, tensor in placeholders:
        if tensor is None:
            with mode:
                fakes.append(torch.empty(tuple(node.meta["val"].shape), dtype=node.meta["val"].dtype))
        else:
            fakes.append(mode.from_tensor(tensor))
    with quiet_torch():
        FakeTensorProp(torch.fx.GraphModule(torch.nn.Module(), graph), mode).propagate_dont_convert_inputs(*fakes)


def first_failing(check: Callable[[list[str]], Any], nodes: Sequence[str],
                  together: Mapping[str, Sequence[str]] | None = None) -> Iterator[tuple[str, Any, bool]]:
    """The nodes that break a group, for :meth:`handoff.Compiler.check_partition`. Public API.

    ``check(names)`` test-compiles ``names`` (a sub-list of ``nodes``, in their order) as one
    group and returns ``None`` when it compiles, otherwise the failure (the compiler's message).
    A group with nothing to compile (only weights, no outputs) should pass: such a prefix is no
    node's fault.

    The first round checks the whole group; when it fails, bisection finds the smallest failing
    prefix (topological order: what precedes the culprit compiles without it) in about log2(n)
    checks, and yields ``(node, failure, alone)``: its last node, ``check``'s answer for that
    prefix, and whether that prefix is the node alone (when not, what precedes it passes without
    it). The node is taken out and the next round checks the rest; when it fails again, the search
    starts where the last one stopped: the prefix before the culprit is known to pass, so longer
    prefixes are tried at growing distances from it (1, 2, 4, ... nodes more) and bisection
    narrows the gap. A group with many culprits close together costs about 1 + 2*log2(gap) checks
    each instead of 1 + log2(n) (683 nodes with a culprit every 7: 593 checks instead of 1019).
    Rounds go on until the rest compiles (then the last call of ``check`` was on exactly the nodes
    left, so a compiler may keep that result for ``preprocess``) or nothing is left. ``check`` is
    assumed monotone (a failing prefix keeps failing when nodes are added after it); where it is
    not, the node found still fails with what precedes it, which passed without it.

    ``together`` maps a node to the nodes that must never be cut from it: every checked prefix
    holding the node holds them too (in their place in ``nodes``), and when the node is the
    culprit they are yielded after it with the same failure. A quantized graph needs this: a
    prefix that ends between a quantize and its dequantize hands an integer tensor across the
    cut, which a compiler may refuse on its own (the QNN EP does), so an unconstrained bisection
    would blame every quantize it cuts through instead of the op at fault: map each quantize to
    its dequantize users (the ``qnn`` plugin's check does).
    """
    together = together or {}
    remaining = list(nodes)

    def prefix(k: int) -> list[str]:
        held = {m for n in remaining[:k] for m in _closure(together, n)}
        return [n for n in remaining if n in held]

    failure = check(remaining)
    if failure is None:
        return
    lo, hi = 1, len(remaining)  # the smallest k with prefix(k) failing lies in [lo, hi]
    while True:
        while lo < hi:
            mid = (lo + hi) // 2
            result = check(prefix(mid))
            if result is None:
                lo = mid + 1
            else:
                hi, failure = mid, result
        culprit = remaining.pop(hi - 1)
        yield culprit, failure, hi == 1
        tied = set(_closure(together, culprit))
        for other in [n for n in remaining if n in tied]:
            remaining.remove(other)
            yield other, failure, False
        if not remaining:
            return
        failure = check(remaining)
        if failure is None:
            return
        passed, step = hi - 1, 1  # prefix(passed) passed (checked, or empty)
        while True:  # gallop: the first failing prefix beyond the one that passed
            k = passed + step
            if k >= len(remaining):
                lo, hi = passed + 1, len(remaining)
                break
            result = check(prefix(k))
            if result is not None:
                failure = result
                lo, hi = passed + 1, k
                break
            passed, step = k, step * 2


def _closure(together: Mapping[str, Sequence[str]], node: str) -> list[str]:
    """``node`` and every node ``together`` ties to it, transitively."""
    seen, todo = [node], [node]
    while todo:
        for other in together.get(todo.pop(), ()):
            if other not in seen:
                seen.append(other)
                todo.append(other)
    return seen


def graph_digest(ep: Any) -> str:
    """A digest of ``ep``'s content: its graph (node names, ops, arguments), every node's dtypes
    and shapes, and its weights. Backends' capability answers are cached under it
    (:class:`handoff.cache.CapabilityCache`): they name nodes, so the names are part of it."""
    h = hashlib.sha256(str(ep.graph).encode())
    for n in ep.graph.nodes:
        h.update(f"{n.name}:{_meta_text(n)}\n".encode())
    for name, (kind, tensor) in sorted(weight_tensors(ep).items()):
        h.update(f"{name}:{kind}\n".encode())
        h.update(_tensor_bytes(tensor))
    return h.hexdigest()


class _ContentKeys:
    """Content keys of partitions of one program, computed from the parent graph alone: each node's
    op, its arguments (other nodes by their position: inside the partition, an input, a weight),
    its output dtypes and shapes, and a digest of every weight it reads. Equal keys mean equal
    extracted programs, so the lowering cache is consulted before anything is exported."""

    def __init__(self, ep: Any):
        self.ep = ep
        self.weights = weight_tensors(ep)
        self._digests: dict[str, str] = {}

    def _digest(self, name: str) -> str:
        if name not in self._digests:
            tensor = self.weights[name][1]
            self._digests[name] = hashlib.sha256(_tensor_bytes(tensor)).hexdigest()
        return self._digests[name]

    def key(self, names: Sequence[str]) -> tuple[str, list[Any], list[Any]]:
        """``(content text, input nodes, output nodes)`` of the partition ``names``."""
        import torch.fx

        nodes, external, used_weights, outputs = partition_io(self.ep, names)
        ref: dict[Any, str] = {}
        parts = []
        for i, inp in enumerate(external):
            ref[inp] = f"%in{i}"
            parts.append(f"in{i}:{_meta_text(inp)}")
        for i, w in enumerate(used_weights):
            ref[w] = f"%w{i}"
            kind = self.weights[w.name][0]
            parts.append(f"w{i}:{kind}:{_meta_text(w)}:{self._digest(w.name)}")

        def encode(arg: Any) -> str:
            if isinstance(arg, torch.fx.Node):
                return ref[arg]
            if isinstance(arg, (list, tuple)):
                return "[" + ",".join(encode(a) for a in arg) + "]"
            if isinstance(arg, dict):
                return "{" + ",".join(f"{k}={encode(v)}" for k, v in arg.items()) + "}"
            return f"{type(arg).__name__}:{arg!r}"

        for i, n in enumerate(nodes):
            ref[n] = f"%n{i}"
            parts.append(f"n{i}={op_name(n.target)}({encode(list(n.args))};{encode(dict(n.kwargs))})->{_meta_text(n)}")
        parts.append("out:" + ",".join(ref[o] for o in outputs))
        return "\n".join(parts), external, outputs


def _meta_text(node: Any) -> str:
    """Dtype and shape of a node's value(s) (``str(graph)`` shows neither, and the same ops on
    other shapes lower to another blob: TVM specialises on them)."""
    import torch

    val = node.meta.get("val")
    leaves = val if isinstance(val, (list, tuple)) else [val]
    return "|".join(f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" if isinstance(v, torch.Tensor)
                    else type(v).__name__ for v in leaves)


class Lowerer:
    """Lowers the partitions of a plan, with the cache and the fallback bookkeeping.

    :param identities: backend -> what its blobs depend on besides the partition and the options:
        the plugin's code identity (:meth:`handoff.Plugins.code_identity`) and version.
    """

    def __init__(self, ep: Any, compilers: Mapping[str, Any], identities: Mapping[str, str],
                 options: Mapping[str, Mapping[str, Any]], decomp_table: Mapping[Any, Any],
                 use_cache: bool = True):
        self.ep, self.compilers, self.identities, self.options = ep, compilers, identities, options
        self.decomp_table = decomp_table
        self.cache = LoweringCache() if use_cache else None
        self.keys = _ContentKeys(ep)
        self.memo: dict[tuple[str, tuple[str, ...]], LoweredPartition] = {}

    def lower(self, part: Partition) -> LoweredPartition:
        """Lower one partition; raises :class:`LoweringFailure` with the first failing op.

        The cache is looked up by the partition's content key before anything is exported, so a
        fully cached re-partition exports nothing but the model. Failures are cached under the
        same key, with their first failing op (whose search lowers the nodes one by one) and
        message, so a later strategy or run planning the same partition fails at once."""
        key = (part.backend, tuple(part.nodes))
        if key in self.memo:
            return self.memo[key]
        content, inputs, outputs = self.keys.key(part.nodes)
        cache_key = None
        if self.cache is not None:
            compiler = self.compilers[part.backend]
            cache_key = LoweringCache.key(part.backend, self.identities[part.backend], compiler.cache_key(),
                                          json.dumps(dict(self.options.get(part.backend, {})), sort_keys=True,
                                                     default=str),
                                          content)
            hit = self.cache.get(cache_key)
            if hit is not None:
                result = LoweredPartition(part, hit.lowered, 0.0, True, inputs, outputs, hit.compile_seconds)
                self.memo[key] = result
                return result
            failed = self.cache.failure(cache_key)
            if failed is not None:
                raise LoweringFailure(part, failed["message"], failed["first_op"], cached=True)
        sub, _, _ = extract_partition(self.ep, part.nodes, self.decomp_table)
        start = time.perf_counter()
        try:
            lowered = self.compilers[part.backend].preprocess(sub, part.name)
            if not isinstance(lowered, Lowered) or not isinstance(lowered.blob, (bytes, bytearray)):
                raise TypeError(f"preprocess returned {type(lowered).__name__}, expected handoff.Lowered with bytes")
            json.dumps(lowered.metadata)
        except Exception as exc:
            failure = LoweringFailure(part, exc, self._first_failing_op(part, exc, sub))
            if self.cache is not None and cache_key is not None:
                self.cache.put_failure(cache_key, failure.first_op, failure.message, time.perf_counter() - start)
            raise failure from exc
        seconds = time.perf_counter() - start
        result = LoweredPartition(part, Lowered(bytes(lowered.blob), dict(lowered.metadata)),
                                  seconds, False, inputs, outputs, seconds)
        if self.cache is not None and cache_key is not None:
            self.cache.put(cache_key, result.lowered, seconds)
        self.memo[key] = result
        return result

    def _first_failing_op(self, part: Partition, exc: Exception, sub: Any) -> str:
        if isinstance(exc, LoweringError) and exc.node:
            for n in sub.graph.nodes:
                if n.name == exc.node:
                    return f"{n.name} ({op_name(n.target)})"
            return exc.node
        # Unknown: lower the partition's nodes one at a time, in order, to find the first culprit.
        # Nodes that read only weights are skipped: alone they fold to a constant, leaving the
        # compiler nothing to compile, so they would be blamed for any failure.
        by_name = {n.name: n for n in self.ep.graph.nodes}
        weights = weight_tensors(self.ep)
        probes = [n for n in part.nodes if by_name[n].target is not operator.getitem
                  and any(i.name not in weights for i in by_name[n].all_input_nodes)]
        for name in probes[:PROBE_LIMIT]:
            single = [name] + [g for g in part.nodes if by_name[g].target is operator.getitem
                               and by_name[g].args[0].name == name]
            try:
                probe, _, _ = extract_partition(self.ep, single, self.decomp_table)
                self.compilers[part.backend].preprocess(probe, f"{part.name}_probe")
            except Exception:
                return f"{name} ({op_name(by_name[name].target)})"
        return "unknown (every op lowers alone; the combination fails)"


class LoweringFailure(Exception):
    """A partition that failed to lower: where (``first_op``) and the compiler's words. ``cached``:
    remembered from an earlier lowering of the same partition content (the lowering cache)."""

    def __init__(self, part: Partition, exc: Exception | str, first_op: str, cached: bool = False):
        self.part, self.first_op, self.cached = part, first_op, cached
        self.message = " ".join(str(exc).split())[:500] or type(exc).__name__  # the compiler's words
        super().__init__(self.message)


@dataclasses.dataclass
class Assembled:
    manifest: dict[str, Any]
    segments: list[bytes]


def _encode_arg(arg: Any, value_of: Callable[[Any], int], where: str) -> Any:
    import torch
    import torch.fx

    if isinstance(arg, torch.fx.Node):
        return {"value": value_of(arg)}
    if arg is None or isinstance(arg, (bool, int, str)):
        return arg
    if isinstance(arg, float):
        if math.isnan(arg):
            return {"float": "nan"}
        if math.isinf(arg):
            return {"float": "inf" if arg > 0 else "-inf"}
        return arg
    if isinstance(arg, (list, tuple)):
        return [_encode_arg(a, value_of, where) for a in arg]
    if isinstance(arg, torch.dtype):
        return {"dtype": dtype_name(arg, where)}
    if isinstance(arg, torch.device):
        return {"device": "cpu"}
    if isinstance(arg, torch.layout):
        return {"layout": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.memory_format):
        return {"memory_format": str(arg).removeprefix("torch.")}
    raise HandoffError(f"{where}: argument {arg!r} of type {type(arg).__name__} cannot be stored in a program; "
                       f"select a backend that takes this op")


def assemble(ep: Any, plan: Plan, lowered: Mapping[str, LoweredPartition], compilers_options: Mapping[str, Mapping[str, str]],
             versions: Mapping[str, str], metadata: Mapping[str, Any],
             copies: Mapping[str, Sequence[LoweredPartition]] | None = None) -> Assembled:
    """Build the format-1 manifest and segment list for ``plan``. Each value names the fx node of
    ``ep`` that produces it (``node``, informational), which is how :mod:`handoff.numerics`
    finds a delegate's inputs and outputs in an eager run of the same program.

    :param copies: partition name -> the same partition lowered by other backends (fallback
        copies, tried in order where the delegate's own backend cannot run; format 1.3)."""
    import torch

    weights = weight_tensors(ep)
    values: list[dict[str, Any]] = []
    value_ids: dict[str, int] = {}
    segments: list[bytes] = []
    segment_of: dict[bytes, int] = {}  # identical payloads are stored once (format 1.2)
    constants: list[dict[str, int]] = []

    def segment(data: bytes) -> int:
        if data not in segment_of:
            segment_of[data] = len(segments)
            segments.append(data)
        return segment_of[data]

    def new_value(node: Any) -> int:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise HandoffError(f"node {node.name} ({op_name(node.target)}) produces {type(val).__name__}, not a tensor; "
                               f"program format 1 passes only tensors between steps")
        values.append({"dtype": dtype_name(val.dtype, f"node {node.name}"), "shape": [int(d) for d in val.shape],
                       "node": node.name})  # informational: lets tools match values to the graph
        value_ids[node.name] = len(values) - 1
        return len(values) - 1

    def value_of(node: Any) -> int:
        if node.name in value_ids:
            return value_ids[node.name]
        if node.name in weights:  # a weight read outside any delegate becomes a program constant
            vid = new_value(node)
            constants.append({"value": vid, "segment": segment(_tensor_bytes(weights[node.name][1]))})
            return vid
        raise AssertionError(f"value {node.name} used before it is produced")

    sig = ep.graph_signature
    by_name = {n.name: n for n in ep.graph.nodes}
    inputs = []
    for name in sig.user_inputs:
        inputs.append({"name": name, "value": new_value(by_name[name])})

    delegates: list[dict[str, Any]] = []
    instructions: list[dict[str, Any]] = []

    def entry(backend: str, lowered_part: LoweredPartition) -> dict[str, Any]:
        return {"backend": backend, "backend_version": versions[backend], "segment": segment(lowered_part.lowered.blob),
                "metadata": lowered_part.lowered.metadata, "options": dict(compilers_options.get(backend, {}))}

    for step in plan.steps:
        if isinstance(step, Partition):
            lp = lowered[step.name]
            in_ids = [value_of(n) for n in lp.inputs]
            delegate = {**entry(step.backend, lp), "partition": step.name, "nodes": len(step.nodes)}
            fallbacks = [entry(c.partition.backend, c) for c in (copies or {}).get(step.name, ())]
            if fallbacks:
                delegate["fallbacks"] = fallbacks
            delegates.append(delegate)
            instructions.append({"op": "delegate", "delegate": len(delegates) - 1, "inputs": in_ids,
                                 "outputs": [new_value(n) for n in lp.outputs]})
            continue
        node = by_name[step]
        where = f"host op {node.name} ({op_name(node.target)})"
        args = _encode_arg(list(node.args), value_of, where)
        kwargs = {k: _encode_arg(v, value_of, where) for k, v in node.kwargs.items()}
        if isinstance(node.meta.get("val"), (list, tuple)):
            items = {u.args[1]: u for u in node.users if u.target is operator.getitem}
            outs = [new_value(items[i]) if i in items else None for i in range(len(node.meta["val"]))]
        else:
            outs = [new_value(node)]
        instructions.append({"op": "aten", "target": op_name(node.target), "args": args, "kwargs": kwargs,
                             "outputs": outs})

    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outputs = []
    for i, out in enumerate(output_node.args[0]):
        if not isinstance(out, torch.fx.Node):
            raise HandoffError(f"model output {i} is {out!r}, not a tensor; return tensors only")
        outputs.append({"name": f"output_{i}", "value": value_of(out)})

    manifest = {"handoff_version": __version__, "values": values, "inputs": inputs, "outputs": outputs,
                "constants": constants, "delegates": delegates, "instructions": instructions,
                "metadata": dict(metadata)}
    return Assembled(manifest, segments)


__all__ = ["Assembled", "LoweredPartition", "Lowerer", "LoweringFailure", "Move", "assemble", "extract_partition",
           "partition_io", "HOST"]
