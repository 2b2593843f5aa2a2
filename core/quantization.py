"""Step 1b (``--quantize int8``): PT2E quantization with the selected backends' own quantizers.

The flow is PyTorch's PT2E (``torchao.quantization.pt2e``): export the float model, *prepare* it
with a quantizer (which annotates the ops a backend runs in integer arithmetic and inserts
observers), *calibrate* by running it on representative inputs, *convert* (observers become
``quantized_decomposed`` quantize/dequantize ops around each annotated op, weights are stored as
int8), and export the converted module again for the usual partitioning.

The quantizer comes from the backends (:meth:`handoff.Compiler.quantizer`): for a priority list
they are composed as ExecuTorch composes them (torchao's ``ComposableQuantizer``): the
highest-priority backend's quantizer annotates first, and each later one annotates only what is
still unannotated. :class:`Quantized` records which backend's quantizer annotated which ops; the
delegation report shows it.

Calibration data is either the user's (``--calibration-data FILE.npz``: one array per model input,
in input order, each ``(N, *input shape)`` for N batches, or exactly the input's shape for one
batch) or N random batches shaped like the example inputs: normal floats (the statistics of
normalised images and embeddings), so observers see a realistic range rather than constants.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping, Sequence

from .errors import HandoffError, one_line
from .quiet import quiet_loggers
from .zoo import ResolvedModel

#: torchao logs warnings about CUDA kernels a CPU wheel cannot load: noise in a CPU flow.
_TORCHAO_LOGGERS = ("torchao", "torch.utils._pytree")

#: Quantization schemes ``--quantize`` accepts.
SCHEMES = ("int8",)
#: Random calibration batches when neither ``--calibration`` nor ``--calibration-data`` is given.
DEFAULT_CALIBRATION = 8
#: The most calibration batches a run may ask for (each is one eager forward pass).
MAX_CALIBRATION = 10_000
#: The namespace of PT2E's quantize/dequantize ops.
QDQ_NAMESPACE = "quantized_decomposed"
#: The most float ops between a quantized op and the quantize of its result that still form one
#: unit with it (conv -> batch norm -> relu -> q).
_MAX_FLOAT_CHAIN = 3


@dataclasses.dataclass
class Quantized:
    """A model after PT2E quantization.

    :param reference: the converted PT2E module: the quantized eager model every program is
        compared with (it computes int8 rounding exactly as the delegates should).
    :param exported: ``reference`` exported again, holding the quantize/dequantize ops.
    :param annotated: backend id -> op name -> how many ops its quantizer annotated.
    :param float_ops: op name -> how many compute ops no quantizer annotated (they stay float).
    :param calibration: where the calibration data came from, in words.
    :param batches: how many calibration batches ran.
    """

    reference: Any
    exported: Any
    annotated: dict[str, dict[str, int]]
    float_ops: dict[str, int]
    calibration: str
    batches: int
    scheme: str = "int8"

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "calibration": self.calibration, "batches": self.batches,
                "annotated_by": self.annotated, "float_ops": self.float_ops}


def is_quantized(ep: Any) -> bool:
    """Whether an ``ExportedProgram`` (a model, or a partition as ``preprocess`` receives it)
    holds PT2E quantize/dequantize ops: an int8 model. Public API (``handoff.is_quantized``): a
    backend uses it to record, or choose, its integer path."""
    return any(getattr(n.target, "namespace", None) == QDQ_NAMESPACE for n in ep.graph.nodes)


def quantize(model: Any, example_inputs: Sequence[Any] = (), *, backends: Sequence[str] = ("xnnpack",),
             scheme: str = "int8", calibration: int | None = None, calibration_data: Any = None,
             options: Mapping[str, Mapping[str, Any]] | None = None, plugins: Any = None,
             trust_model: bool = False) -> Quantized:
    """PT2E-quantize ``model`` with the quantizers of ``backends`` (priority order).

    :param model: as for :func:`handoff.partition` (a MODEL string, ``nn.Module`` with
        ``example_inputs``, float ``ExportedProgram``).
    :param calibration: random calibration batches (default :data:`DEFAULT_CALIBRATION`).
    :param calibration_data: a ``.npz`` path, or a sequence of batches (each a tuple of tensors
        or arrays, one per input), instead of random batches.
    """
    from .pipeline import _resolve, backend_chain
    from .plugins import get_plugins

    plugins = plugins or get_plugins()
    chain = backend_chain(backends, plugins, fallback=False)
    given = {b: dict(o) for b, o in (options or {}).items()}
    compilers = {b: plugins.compiler(b, given.get(b, {})) for b in chain}
    resolved = _resolve(model, example_inputs, (), plugins, trust_model)
    return quantize_resolved(resolved, compilers, scheme, calibration, calibration_data)


def quantize_resolved(resolved: ResolvedModel, compilers: Mapping[str, Any], scheme: str = "int8",
                      calibration: int | None = None, calibration_data: Any = None) -> Quantized:
    """:func:`quantize` for a resolved model and the selected backends' compilers (priority order)."""
    if scheme not in SCHEMES:
        raise HandoffError(f"--quantize {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if calibration is not None and calibration_data is not None:
        raise HandoffError("give either --calibration N (random batches) or --calibration-data FILE.npz, not both")
    if calibration is not None and not 1 <= calibration <= MAX_CALIBRATION:
        raise HandoffError(f"--calibration {calibration}: give a number of batches from 1 to {MAX_CALIBRATION}")
    import torch

    try:
        with quiet_loggers(*_TORCHAO_LOGGERS):
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise HandoffError(f"--quantize needs torchao ({one_line(exc, 200)}): pip install 'handoff[compile]' "
                           f"(torchao==0.18.0)") from exc

    if resolved.exported is not None and is_quantized(resolved.exported):
        raise HandoffError(f"{resolved.name} is already quantized (it holds {QDQ_NAMESPACE} ops); "
                           f"partition it without --quantize")
    quantizer = _compose(compilers, scheme)
    example = tuple(resolved.example_inputs)
    if not example:
        raise HandoffError(f"{resolved.name}: no example inputs to quantize with; pass --input-shape")
    batches, where = _calibration_batches(example, calibration, calibration_data)

    from .export import quiet_torch

    try:
        with torch.no_grad(), quiet_torch():
            graph = (resolved.exported if resolved.exported is not None
                     else torch.export.export(resolved.module.eval(), example, strict=False)).module()
            prepared = prepare_pt2e(graph, quantizer)
    except HandoffError:
        raise
    except Exception as exc:
        raise HandoffError(f"PT2E prepare of {resolved.name} failed: {one_line(exc, 300)}; the model must "
                           f"export with torch.export (see its docs)") from exc
    float_ops = collections.Counter(_op(n) for n in prepared.graph.nodes
                                    if n.op == "call_function" and n.name in quantizer.unannotated)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                prepared(*batch)
    except Exception as exc:
        raise HandoffError(f"calibration batch {i} ({where}) failed in {resolved.name}: {one_line(exc, 300)}; "
                           f"each batch must match the model's inputs") from exc
    try:
        with torch.no_grad(), quiet_torch():
            converted = convert_pt2e(prepared)
            exported = torch.export.export(converted, example, strict=False)
    except Exception as exc:
        raise HandoffError(f"PT2E convert of {resolved.name} failed: {one_line(exc, 300)}") from exc
    return Quantized(reference=converted, exported=exported, annotated=quantizer.annotated,
                     float_ops=dict(float_ops), calibration=where, batches=len(batches), scheme=scheme)


def _op(node: Any) -> str:
    target = node.target
    if hasattr(target, "namespace"):
        return f"{target.namespace}.{target.__name__}"
    return getattr(target, "__name__", str(target))


def _compose(compilers: Mapping[str, Any], scheme: str) -> Any:
    """The selected backends' quantizers in priority order, composed (see the module docstring)."""
    with quiet_loggers(*_TORCHAO_LOGGERS):
        from torchao.quantization.pt2e.quantizer import ComposableQuantizer
        from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    offered = []
    for backend, compiler in compilers.items():
        try:
            q = compiler.quantizer(scheme)
        except Exception as exc:
            raise HandoffError(f"backend '{backend}': its quantizer for {scheme} failed: {one_line(exc, 300)}") from exc
        if q is not None:
            offered.append((backend, q))
    if not offered:
        raise HandoffError(f"none of the selected backends ({', '.join(compilers)}) offers a quantizer for {scheme}; "
                           f"select one that does (xnnpack, qnn, tvm) or quantize the model yourself with PT2E")

    class Attributed(ComposableQuantizer):
        """torchao's ComposableQuantizer, recording which backend's quantizer annotated which node."""

        def __init__(self) -> None:
            super().__init__([q for _, q in offered])
            self.annotated: dict[str, dict[str, int]] = {}
            self.unannotated: set[str] = set()

        def annotate(self, model: Any) -> Any:
            for backend, q in offered:
                before = {n for n in model.graph.nodes if Q_ANNOTATION_KEY in n.meta}
                q.annotate(model)
                self._record_and_validate_annotations(model, q)
                ops = collections.Counter(_op(n) for n in model.graph.nodes if n.op == "call_function"
                                          and Q_ANNOTATION_KEY in n.meta and n not in before
                                          and n.meta[Q_ANNOTATION_KEY]._annotated)
                self.annotated[backend] = dict(ops)
            self.unannotated = {n.name for n in model.graph.nodes if n.op == "call_function"
                                and Q_ANNOTATION_KEY not in n.meta and _computes(n)}
            return model

    return Attributed()


def _computes(node: Any) -> bool:
    """Whether a node does arithmetic (not a getitem, view or shape query) for the float count."""
    name = getattr(node.target, "__name__", "")
    return not name.startswith(("getitem", "sym_size", "view", "reshape", "flatten", "_assert", "size"))


def _calibration_batches(example: tuple[Any, ...], n: int | None, data: Any) -> tuple[list[tuple[Any, ...]], str]:
    """The calibration batches and where they come from, in words."""
    import torch

    if data is None:
        n = n or DEFAULT_CALIBRATION
        from .zoo import random_inputs

        specs = [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in example]
        return [random_inputs(specs, seed=1000 + i) for i in range(n)], f"{n} random batches"
    if isinstance(data, (str, os.PathLike)):
        batches = _read_npz(str(data), example)
        return batches, f"{data}: {len(batches)} batches"
    batches = [tuple(torch.as_tensor(v) for v in (b if isinstance(b, (tuple, list)) else [b])) for b in data]
    for i, b in enumerate(batches):
        _check_batch(b, example, f"calibration batch {i}")
    if not batches:
        raise HandoffError("calibration_data holds no batches")
    return batches, f"{len(batches)} given batches"


def _read_npz(path: str, example: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Batches from a ``.npz`` (see the module docstring); read without pickles (untrusted)."""
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [npz[k] for k in npz.files]
    except FileNotFoundError:
        raise HandoffError(f"--calibration-data {path}: no such file") from None
    except Exception as exc:
        raise HandoffError(f"--calibration-data {path}: not a numpy .npz file ({one_line(exc, 200)}); "
                           f"write one with numpy.savez(path, input0_batches, ...)") from exc
    if len(arrays) != len(example):
        raise HandoffError(f"--calibration-data {path}: holds {len(arrays)} array(s), the model has {len(example)} "
                           f"input(s); give one array per input, in input order, shaped (N, *input shape)")
    counts = set()
    for i, (a, x) in enumerate(zip(arrays, example)):
        shape = tuple(x.shape)
        if a.shape == shape:
            counts.add(1)
        elif a.shape[1:] == shape and a.shape[0] > 0:
            counts.add(a.shape[0])
        else:
            raise HandoffError(f"--calibration-data {path}: array {i} has shape {list(a.shape)}; input {i} is "
                               f"{list(shape)}, so give (N, {', '.join(map(str, shape))})")
    if len(counts) != 1:
        raise HandoffError(f"--calibration-data {path}: the arrays hold different numbers of batches "
                           f"({', '.join(map(str, sorted(counts)))}); give the same N for every input")
    n = counts.pop()
    if n > MAX_CALIBRATION:
        raise HandoffError(f"--calibration-data {path}: {n} batches; at most {MAX_CALIBRATION}")
    batches = []
    for j in range(n):
        batch = tuple(torch.from_numpy(np.array(a if a.shape == tuple(x.shape) and n == 1 else a[j]))
                      for a, x in zip(arrays, example))
        _check_batch(batch, example, f"--calibration-data {path}: batch {j}")
        batches.append(batch)
    return batches


def _check_batch(batch: tuple[Any, ...], example: tuple[Any, ...], where: str) -> None:
    if len(batch) != len(example):
        raise HandoffError(f"{where}: {len(batch)} value(s), the model has {len(example)} input(s)")
    for i, (b, x) in enumerate(zip(batch, example)):
        if tuple(b.shape) != tuple(x.shape) or b.dtype != x.dtype:
            raise HandoffError(f"{where}: input {i} is {str(b.dtype).removeprefix('torch.')}{list(b.shape)}, "
                               f"the model takes {str(x.dtype).removeprefix('torch.')}{list(x.shape)}")


def duplicate_dequantize(ep: Any) -> int:
    """Give every consumer of a shared dequantize op its own copy, in place, so that consumers
    landing on different backends each receive the int8 value and dequantize it inside their own
    delegate (no dequantize is stranded between them). Returns how many copies were made."""
    graph, made = ep.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not _is_qdq(node, "dequantize"):
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                copy = graph.node_copy(node)
            copy.meta = dict(node.meta)
            user.replace_input_with(node, copy)
            made += 1
    if made:
        ep.graph_module.recompile()
    return made


def _is_qdq(node: Any, kind: str) -> bool:
    return getattr(node.target, "namespace", None) == QDQ_NAMESPACE and node.target.__name__.startswith(kind)


def quantized_dtype(node: Any) -> Any:
    """The integer dtype of a PT2E quantize/dequantize node (``torch.int8`` for
    ``quantized_decomposed.quantize_per_tensor(x, scale, zero_point, -128, 127, torch.int8)``), or
    None when ``node`` is no such op. Public API (``handoff.quantized_dtype``): a backend checks it
    against the dtypes its integer kernels take.

    The argument is found by its schema name, ``dtype``, as torch.fx binds the call
    (:func:`torch.fx.operator_schemas.normalize_function`): positionally or as a keyword, its
    default where the call leaves it out. Its position differs between the ops (5 in
    ``quantize_per_tensor`` and ``quantize_per_channel_group``, 6 in ``quantize_per_channel``
    after the axis), so an index is wrong for some of them."""
    if not (_is_qdq(node, "quantize") or _is_qdq(node, "dequantize")):
        return None
    from torch.fx.operator_schemas import normalize_function

    bound = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    return None if bound is None else bound.kwargs.get("dtype")


def quantized_spans(ep: Any) -> list[list[str]]:
    """The quantized units of an int8 graph, as node name groups: the core adds them to every
    backend's fused patterns, so an op travels with its quantize/dequantize ops (a backend takes
    the whole unit as int8, or none of it, with a reason). Call after :func:`duplicate_dequantize`,
    so units are disjoint (each dequantize has one consumer).

    A unit is an op with the quantize ops after it and the dequantize ops before it, extended
    along a chain of single-user float ops to the op whose result is quantized: PT2E leaves
    ``dq -> conv -> relu -> q`` (a fused activation) and ``dq -> view -> linear -> q`` with no
    quantize between the ops. A unit whose result stays float (no quantize after it, e.g. an op
    no quantizer annotated) keeps its weight dequantize ops but not those of int8 activations:
    such a dequantize may stay with the producer's delegate, which then hands over float, so a
    backend that declines the float op strands no dequantize on the host."""
    parent: dict[Any, Any] = {}

    def find(n: Any) -> Any:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def computes(n: Any) -> bool:
        return n.op == "call_function" and getattr(n.target, "namespace", None) != QDQ_NAMESPACE

    def quantized_out(n: Any) -> bool:
        return any(_is_qdq(u, "quantize") for u in n.users)

    ops = [n for n in ep.graph.nodes if computes(n) and (quantized_out(n) or any(
        _is_qdq(a, "dequantize") for a in n.all_input_nodes))]
    for n in ops:
        parent.setdefault(n, n)
    for n in ops:  # extend to the op whose result is quantized (a short single-user float chain)
        chain, cur = [n], n
        while not quantized_out(cur) and len(chain) <= _MAX_FLOAT_CHAIN and len(cur.users) == 1:
            cur = next(iter(cur.users))
            if not computes(cur):
                break
            chain.append(cur)
        if quantized_out(cur) and len(chain) > 1:
            for m in chain:
                parent.setdefault(m, m)
                parent[find(m)] = find(n)
    units: dict[Any, list[Any]] = {}
    for n in parent:
        units.setdefault(find(n), []).append(n)
    spans = []
    for members in units.values():
        quantized = any(quantized_out(m) for m in members)
        before = [a for m in members for a in m.all_input_nodes if _is_qdq(a, "dequantize")
                  and (quantized or not _is_activation(a))]
        after = [u for m in members for u in m.users if _is_qdq(u, "quantize")]
        names = [n.name for n in (*before, *members, *after)]
        if len(names) > 1:
            spans.append(list(dict.fromkeys(names)))
    return spans


def _is_activation(dequantize: Any) -> bool:
    """Whether a dequantize op reads an int8 activation (a quantize op's result), not a weight."""
    source = dequantize.args[0] if dequantize.args else None
    return getattr(source, "op", None) == "call_function" and _is_qdq(source, "quantize")
