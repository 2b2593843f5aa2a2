"""The ahead-of-time half of the ``vulkan`` backend (imports torch and TVM).

Capability (:meth:`VulkanCompiler.support`) is checked in two steps, both per node:

1. static: the node must be something TVM's Relax importer converts (the built-in ``tvm``
   backend's own check, :func:`handoff.tvm.importer.decline_reason`), and every tensor it reads or
   writes must be float32, float16 or int32 and non-empty, since a WGSL storage buffer holds
   nothing else (no 64-bit or 8/16-bit integers, no bool; f16 needs the adapter's shader-f16
   feature, which the runtime checks when it loads the delegate), and its own kernel must bind at
   most ``max_storage_buffers`` storage buffers (tensor inputs + outputs; default WebGPU's
   guaranteed 8 per shader stage, so the blob loads on any adapter; a concatenation of more is
   lowered as several within it: :func:`handoff_vulkan._tvm.relax_passes`), none of them larger than
   ``max_storage_buffer_binding_size`` (default WebGPU's guaranteed 128 MiB: AlexNet's first
   classifier weight, 144 MiB, would make a program no adapter at the default limits loads);
2. kernels: the nodes that pass are imported into Relax together, in one pass that remembers
   which Relax bindings each node produced; each op is legalized to TIR without fusion, scheduled
   with the dlight GPU rules (a schedule leaving a block unbound to GPU threads counts as none),
   lowered and turned into WGSL. A node whose kernel fails any of these is declined with TVM's
   reason. Results are cached per kernel (structural hash) for the life of the process.

:meth:`VulkanCompiler.preprocess` then lowers a partition with fusion on (see
:mod:`handoff_vulkan._tvm`), leaving unfused every fused group whose tensor parameters + outputs
exceed the storage-buffer budget; should a fused kernel find no schedule, or still bind more
buffers than the budget once lowered, the partition is lowered again without fusion, which step 2
has checked op by op (a kernel over the budget even unfused is a :class:`LoweringError`).
"""

from __future__ import annotations

import json
import logging
import operator
from typing import Any, Mapping

import torch
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

# The built-in TVM backend's importer checks: this backend imports with the same Relax importer,
# so what it can import is exactly what that backend claims (not duplicated here).
from handoff.tvm import TVM_NAME, converters, import_partition, importer_digest, tvm_message
from handoff.tvm import decline_reason as _importer_decline_reason

from handoff import Compiler, Lowered, LoweringError, quiet_native

from . import WGPU_VERSION, __version__, _tvm
from ._format import FORMAT_VERSION, MAX_BINDING_BYTES, MAX_STORAGE_BUFFERS, pack

_log = logging.getLogger(__name__)
#: Tensor dtypes a node may read or write (the torch side of _format.DTYPES; torch has no full uint32).
_TORCH_DTYPES = {torch.float32, torch.int32, torch.float16}
_DTYPE_REASONS = {
    torch.int64: "int64 tensor: WGSL has no 64-bit integers",
    torch.uint64: "uint64 tensor: WGSL has no 64-bit integers",
    torch.float64: "float64 tensor: WGSL has no 64-bit floats",
    torch.bfloat16: "bfloat16 tensor: WGSL has no bfloat16",
    torch.bool: "bool tensor: a WGSL storage buffer cannot hold bool",
    torch.int8: "int8 tensor: WGSL has no 8-bit integers",
    torch.uint8: "uint8 tensor: WGSL has no 8-bit integers",
    torch.int16: "int16 tensor: WGSL has no 16-bit integers",
    torch.uint16: "uint16 tensor: WGSL has no 16-bit integers",
}
_CAT = torch.ops.aten.cat.default
# Relax ops allowed between kernels after legalization (everything else must become a call_tir).
_GLUE_OPS = {"relax.call_tir", "relax.reshape"}


class VulkanCompiler(Compiler):
    """Lowers partitions to WGSL kernels and a launch plan (see :class:`handoff.Compiler`)."""

    #: unscheduled PrimFunc structural hash -> None (kernel builds) or why not; process-wide.
    _kernel_cache: dict[int, str | None] = {}

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.fuse = bool(options.get("fuse", True))
        self.max_buffers = int(options.get("max_storage_buffers", MAX_STORAGE_BUFFERS))
        self.max_binding = int(options.get("max_storage_buffer_binding_size", MAX_BINDING_BYTES))
        self.target = _tvm.target()

    def cache_key(self) -> str:
        # The TVM build and handoff's TVM importer (its own converters, e.g. select.int) decide the
        # blob too; the core adds this plugin's code and version, not the importer's.
        return json.dumps({"tvm": tvm.__version__, "target": _tvm.TARGET_CONFIG, "blob_format": FORMAT_VERSION,
                           "importer": importer_digest()}, sort_keys=True)

    # -- capability ------------------------------------------------------------------------------
    def support(self, ep: Any) -> Mapping[str, str | None]:
        reasons = {n.name: _static_reason(n) or self._budget_reason(n)
                   for n in ep.graph.nodes if n.op == "call_function"}
        candidates = {name for name, reason in reasons.items() if reason is None}
        if candidates:
            try:
                reasons.update(self._kernel_reasons(ep, candidates))
            except Exception as exc:  # the check itself broke: claim on the static check alone
                _log.warning("vulkan: per-node kernel check failed (%s); claiming on dtype and importer checks "
                             "only, lowering may then fail (--on-lower-error fallback moves such partitions)",
                             tvm_message(exc))
        return reasons

    def _budget_reason(self, node: Any) -> str | None:
        """Why the node's own kernel would bind more storage buffers than ``max_storage_buffers``,
        or one larger than ``max_storage_buffer_binding_size``."""
        tensors = _bound_tensors(node)
        split = node.target is _CAT and _tvm.splits_concat(self.max_buffers)  # lowered as several within it
        if len(tensors) > self.max_buffers and not split:
            return (f"its kernel would bind {len(tensors)} storage buffers (tensor inputs + outputs), over the budget of "
                    f"{self.max_buffers} (option vulkan.max_storage_buffers; raise it only if the target adapter allows "
                    f"that many per shader stage)")
        what, tensor = max(tensors, key=lambda t: _nbytes(t[1]), default=(None, None))
        if tensor is None or _nbytes(tensor) <= self.max_binding:
            return None
        return (f"its kernel would bind {what}, {str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)} "
                f"({_nbytes(tensor)} bytes), over the storage-buffer size budget of {self.max_binding} bytes (option "
                f"vulkan.max_storage_buffer_binding_size; raise it only if the target adapter allows bindings that large)")

    def _kernel_reasons(self, ep: Any, candidates: set[str]) -> dict[str, str]:
        """Step 2 of the module docstring: ``{node: reason}`` for candidates whose kernel fails."""
        failures: dict[str, str] = {}
        mod, owners = _tagged_import(ep, candidates, failures)
        node_of = _attribute(_bindings(mod["main"]), owners)
        with self.target, quiet_native():  # TOPI warns on every take it legalizes (select, embedding)
            mod = tvm.transform.Sequential(_tvm.relax_passes(fuse=False, max_buffers=self.max_buffers))(mod)
        func_nodes: dict[str, set[str]] = {}
        pending: list[Any] = []
        for binding in _bindings(mod["main"]):
            pending.append(binding)
            node = node_of.get(_tvm._key(binding.var))
            if node is None:
                continue
            for b in pending:
                value = b.value
                if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                    if value.op.name == "relax.call_tir":
                        func_nodes.setdefault(value.args[0].name_hint, set()).add(node)
                    elif value.op.name not in _GLUE_OPS and node in candidates:
                        failures.setdefault(node, f"{TVM_NAME} has no GPU kernel for Relax op {value.op.name}")
            pending = []

        funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
        for name, reason in self._check_kernels({n: funcs[n] for n in func_nodes if n in funcs}).items():
            if reason:
                for node in func_nodes[name]:
                    if node in candidates:
                        failures.setdefault(node, reason)
        return failures

    def _check_kernels(self, funcs: dict[str, Any]) -> dict[str, str | None]:
        """Schedule, lower and generate WGSL for each unfused PrimFunc; ``{name: None | reason}``."""
        results: dict[str, str | None] = {}
        todo: dict[str, tuple[int, Any]] = {}
        for name, func in funcs.items():
            h = tvm_ffi.structural_hash(func)
            if h in self._kernel_cache:
                results[name] = self._kernel_cache[h]
                continue
            scheduled, why = _tvm.schedule(func.with_attr("target", self.target), self.target)
            if scheduled is None:
                results[name] = self._kernel_cache[h] = f"no {TVM_NAME} dlight GPU schedule binds every block: {why}"
            else:
                todo[name] = (h, scheduled)
        if todo:
            try:  # one batch; on failure, one by one to find the culprits
                _tvm.lower_tir({n: f for n, (_, f) in todo.items()}, self.target)
                batch_ok = True
            except Exception:
                batch_ok = False
            for name, (h, scheduled) in todo.items():
                reason = None
                if not batch_ok:
                    try:
                        _tvm.lower_tir({name: scheduled}, self.target)
                    except Exception as exc:
                        reason = f"{TVM_NAME} cannot build its WGSL kernel: {tvm_message(exc)}"
                results[name] = self._kernel_cache[h] = reason
        return results

    # -- lowering --------------------------------------------------------------------------------
    def preprocess(self, ep: Any, name: str) -> Lowered:
        for node in ep.graph.nodes:
            if node.op == "call_function":
                reason = _static_reason(node) or self._budget_reason(node)
                if reason:
                    raise LoweringError(f"{node.name}: {reason}", node=node.name)
        mod, inputs, outputs = import_partition(ep)

        fused = self.fuse
        try:
            plan, weights = self._lower(mod, fused)
        except _tvm.LowerError as exc:
            if not fused:
                raise LoweringError(f"{name}: {exc}") from exc
            fused = False  # every op was checked unfused by support(): fusion made the kernel unschedulable
            try:
                plan, weights = self._lower(mod, fused)
            except _tvm.LowerError as exc2:
                raise LoweringError(f"{name}: {exc2}") from exc2
        if fused and self._over_budget(plan):
            # the groups over budget were split before FuseTIR (_tvm._unfuse_over); lowering may still bind more
            _log.info("vulkan: %s: a fused kernel binds more than %d storage buffers; lowering unfused", name,
                      self.max_buffers)
            fused = False
            try:
                plan, weights = self._lower(mod, fused)
            except _tvm.LowerError as exc:
                raise LoweringError(f"{name}: {exc}") from exc
        over = self._over_budget(plan)
        if over:
            raise LoweringError(f"{name}: kernel {over['name']} binds {len(over['bindings'])} storage buffers, over the "
                                f"budget of {self.max_buffers} (option vulkan.max_storage_buffers); raise the option "
                                f"if the target adapter allows that many, or partition these nodes to another backend")
        largest = plan["limits"]["max_storage_buffer_binding_size"]
        if largest > self.max_binding:  # a buffer that is no node's tensor (a kernel's scratch)
            kinds = sorted({b["kind"] for b in plan["buffers"] if b["nbytes"] == largest})
            raise LoweringError(f"{name}: its plan binds a {' or '.join(kinds)} buffer of {largest} bytes, over the "
                                f"storage-buffer size budget of {self.max_binding} bytes (option "
                                f"vulkan.max_storage_buffer_binding_size); raise the option if the target adapter "
                                f"allows bindings that large, or partition these nodes to another backend")
        blob = pack(plan, bytes(weights))
        return Lowered(blob, {
            "compiler": "apache-tvm",
            "tvm_version": tvm.__version__,
            "target": {k: v for k, v in _tvm.TARGET_CONFIG.items() if k != "host"},
            "blob_format": FORMAT_VERSION,
            "plugin_version": __version__,
            "wgpu": WGPU_VERSION,
            "fused": fused,
            "kernels": len(plan["kernels"]),
            "dispatches": len(plan["dispatches"]),
            "weight_bytes": len(weights),
            "num_inputs": len(inputs),
            "num_outputs": len(outputs),
            "inputs": inputs,
            "outputs": outputs,
        })

    def _over_budget(self, plan: dict[str, Any]) -> dict[str, Any] | None:
        """The first kernel of the plan binding more storage buffers than the budget, if any."""
        return next((k for k in plan["kernels"] if len(k["bindings"]) > self.max_buffers), None)

    def _lower(self, mod: Any, fuse: bool) -> tuple[dict[str, Any], bytearray]:
        tgt = self.target
        with tgt, quiet_native():  # as in _kernel_reasons
            mod = tvm.transform.Sequential(_tvm.relax_passes(fuse, self.max_buffers, fold=True))(mod)
        mod, failed = _tvm.schedule_module(mod, tgt)
        if failed:
            shown = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
            raise _tvm.LowerError(f"no {TVM_NAME} dlight GPU schedule binds every block of {shown}", failed)
        with tgt:
            mod = tvm.transform.Sequential([
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
            ])(mod)
        funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
        try:
            hosts, kernels = _tvm.lower_tir(funcs, tgt)
        except _tvm.LowerError:
            raise
        except Exception as exc:  # a TVM pass failed
            raise _tvm.LowerError(f"{TVM_NAME} TIR lowering failed: {tvm_message(exc)}") from exc
        builder = _tvm.PlanBuilder(hosts, kernels)
        plan = builder.build(mod["main"])
        return plan, builder.weights


# -- capability helpers -------------------------------------------------------------------------
def _static_reason(node: Any) -> str | None:
    """``None`` when the node passes step 1 of the module docstring, else why not."""
    if node.target is operator.getitem:
        return None  # the core keeps every getitem with its producer
    reason = _importer_decline_reason(node)
    if reason:
        return reason
    for value in [_used_outputs(node), *(n.meta.get("val") for n in node.all_input_nodes)]:
        for leaf in torch.utils._pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                if leaf.dtype not in _TORCH_DTYPES:
                    dtype = str(leaf.dtype).removeprefix("torch.")
                    return _DTYPE_REASONS.get(leaf.dtype, f"{dtype} tensor: only float32, float16 and int32 tensors are supported")
                if leaf.numel() == 0:
                    return "zero-element tensor: a GPU buffer cannot be empty"
    return None


def _bound_tensors(node: Any) -> list[tuple[str, torch.Tensor]]:
    """The storage buffers the node's own kernel binds, as ``(what, example tensor)``: a tensor
    read (each argument, a repeated one too, as TVM passes it) or written."""
    inputs: list[Any] = []
    torch.fx.node.map_arg((node.args, node.kwargs), inputs.append)
    read = [(f"input {a.name}", a.meta["val"]) for a in inputs if isinstance(a.meta.get("val"), torch.Tensor)]
    written = [v for v in torch.utils._pytree.tree_leaves(_used_outputs(node)) if isinstance(v, torch.Tensor)]
    return read + [("its output" if len(written) == 1 else f"output {i}", v) for i, v in enumerate(written)]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _used_outputs(node: Any) -> Any:
    """The node's output value, or for a multi-output node only the items some getitem reads
    (``max_pool2d_with_indices``'s int64 indices or batch norm's empty saved statistics are
    usually never read)."""
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        return [v for i, v in enumerate(val) if i in used]
    return val


def _tagged_import(ep: Any, candidates: set[str], failures: dict[str, str]) -> tuple[Any, dict[int, str]]:
    """Import the whole graph with TVM's importer, converting only ``candidates``: every other node
    (and any candidate whose converter raises, recorded in ``failures``) becomes a placeholder
    tensor of its shape. The converters are the importer's own with handoff's over them
    (:func:`handoff.tvm.converters`, bound to this importer), as :func:`handoff.tvm.import_partition`
    imports for :meth:`VulkanCompiler.preprocess`. Returns the import and, for each Relax var a
    node's conversion returned, that node's name."""
    importer = ExportedProgramImporter()
    table = {**importer.convert_map,
             **{key: _bound(fix, importer) for key, fix in converters().items()}}

    def placeholder(node: Any) -> Any:
        def zeros(val: Any) -> Any:
            return importer.block_builder.emit(
                relax.op.zeros(relax.ShapeExpr([int(d) for d in val.shape]), str(val.dtype).removeprefix("torch.")))

        val = node.meta.get("val")
        if val is None:  # a node with no value (_assert_tensor_metadata, ...)
            return None
        if isinstance(val, torch.Tensor):
            return zeros(val)
        if isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
            return relax.Tuple([zeros(v) for v in val])
        raise ValueError(f"node {node.name} produces {type(val).__name__}")

    def wrap(fn: Any) -> Any:
        def convert(node: Any) -> Any:
            if fn is not None and (node.name in candidates or node.target is operator.getitem):
                try:
                    return fn(node)
                except Exception as exc:
                    failures[node.name] = f"{TVM_NAME} Relax importer failed: {tvm_message(exc)}"
            return placeholder(node)

        return convert

    wrapped = {name: wrap(fn) for name, fn in table.items() if isinstance(name, str)}
    for node in ep.graph.nodes:
        if node.op == "call_function":
            wrapped.setdefault(node.target.__name__, wrap(None))
    importer.convert_map = {**table, **wrapped}
    module = importer.from_exported_program(ep, False, False, False, None)
    owners: dict[int, str] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and node in importer.env:
            for var in _vars(importer.env[node]):
                owners.setdefault(_tvm._key(var), node.name)
    return module, owners


def _bound(fix: Any, importer: Any) -> Any:
    """A ``custom_convert_map`` converter (``fix(node, importer)``) as an importer's own table
    holds one (``convert(node)``)."""
    return lambda node: fix(node, importer)


def _vars(value: Any) -> list[Any]:
    if isinstance(value, tvm.ir.Var):
        return [value]
    if isinstance(value, relax.Tuple):
        return [v for f in value.fields for v in _vars(f)]
    if isinstance(value, (list, tuple)):
        return [v for f in value for v in _vars(f)]
    return []


def _bindings(func: Any) -> list[Any]:
    return [b for block in func.body.blocks for b in block.bindings]


def _attribute(bindings: list[Any], owners: dict[int, str]) -> dict[int, str]:
    """Bindings to nodes: the importer emits a node's bindings in a run ending with the var the
    conversion returned, so each run belongs to the node owning its last var."""
    node_of: dict[int, str] = {}
    pending: list[int] = []
    for binding in bindings:
        pending.append(_tvm._key(binding.var))
        node = owners.get(pending[-1])
        if node is not None:
            for key in pending:
                node_of[key] = node
            pending = []
    return node_of
