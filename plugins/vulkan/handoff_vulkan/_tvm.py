"""The TVM half of the compiler: Relax -> GPU-scheduled TIR -> WGSL kernels and a launch plan.

Pipeline, for TVM 0.27's ``webgpu`` target (TVM has no Vulkan/SPIR-V code generator, but WGSL is
what wgpu turns into SPIR-V for Vulkan):

1. Relax: ``DecomposeOpsForInference``, ``LegalizeOps`` (every op becomes a TIR PrimFunc),
   ``AnnotateTIROpPattern``, then ``FuseOps`` + ``FuseTIR`` (unless fusion is off).
2. dlight GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Transpose, Fallback), tried in
   order per PrimFunc, then handoff's :class:`_UnitReduction` for functions that reduce over
   extent-1 iterators only (``Linear(1, N)``: K = 1), where dlight's schedules are wrong; a rule whose
   schedule leaves any store outside a thread-bound loop (dlight's Transpose can), or that inlines
   an epilogue into a unit reduction's init (:func:`broken_reductions`), counts as not applicable,
   and the next rule is tried.
3. Relax again: ``CallTIRRewrite`` (destination-passing calls) and ``StaticPlanBlockMemory``,
   whose storage tokens become the delegate's intermediate buffers, reused across tensors whose
   lifetimes do not overlap.
4. TIR: TVM's default GPU lowering pipeline. The module is snapshotted right after
   ``SplitHostDevice``: there, each host function still has its buffer parameters, and its body is
   only buffer declarations and ``call_ffi_kernel(name, args..., launch extents...)`` statements:
   that is the launch plan (which kernels, in which order, on which buffers, with which scalar
   arguments and grid). The device functions go on through the rest of the pipeline and the WGSL
   code generator, one module per kernel.
5. The Relax ``main`` is then walked binding by binding: allocations become buffers, constants
   weights, reshapes views, and every call of a PrimFunc expands into its host function's launches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, sym, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.tirx.build import split_host_device_mods

from handoff.tvm import TVM_NAME, tvm_message

from . import wgsl
from ._format import DATA_ALIGN, DTYPES, MAX_GRID_DIM

#: The TVM target. The limits are WebGPU's guaranteed minimums, so every Vulkan GPU wgpu exposes
#: can run the kernels: 256 invocations and 16 KiB of workgroup memory per workgroup.
TARGET_CONFIG: dict[str, Any] = {"kind": "webgpu", "max_num_threads": 256, "max_shared_memory_per_block": 16384,
                                 "host": {"kind": "c"}}
_SPLIT_PASS = "tirx.SplitHostDevice"


class LowerError(Exception):
    """Lowering failed; ``funcs`` names the PrimFuncs involved, when known."""

    def __init__(self, message: str, funcs: Iterable[str] = ()):
        super().__init__(message)
        self.funcs = list(funcs)


def target() -> Any:
    return tvm.target.Target(TARGET_CONFIG)


def _key(obj: Any) -> int:
    """Identity of an IR object (its C handle), for dicts: ``==`` on TIR vars builds expressions."""
    return obj.__chandle__()


# -- scheduling -----------------------------------------------------------------------------------
#: Reductions at most this long (a depthwise 3x3 convolution's 9) run serially in one thread per
#: output: dlight's Reduction rules would give each output a workgroup of 64 threads and a
#: cross-thread reduction, mostly idle threads and barriers.
SMALL_REDUCTION = 64


def _rules() -> list[Any]:
    # _UnitReduction last: only for what dlight schedules wrongly (broken_reductions refuses it).
    return [dl.gpu.Matmul(), _SmallReduction(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Transpose(), dl.gpu.Fallback(), _UnitReduction()]


def reduction_extents(func: Any) -> list[int]:
    """Per reduction block of ``func``, its length (product of its reduction iterator extents;
    1 << 30 when not static)."""
    found: list[int] = []

    def visit(stmt: Any) -> None:
        if isinstance(stmt, s_tir.SBlock):
            extents = [iv.dom.extent for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
            if extents:
                if not all(isinstance(e, tirx.IntImm) for e in extents):
                    found.append(1 << 30)
                else:
                    found.append(math.prod(int(e.value) for e in extents))

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)], order="post")
    return found


def reduction_extent(func: Any) -> int:
    """The longest reduction (product of a block's reduction iterator extents) in ``func``; 0 if none."""
    return max(reduction_extents(func), default=0)


class _SmallReduction(dl.gpu.Fallback):
    """dlight's Fallback (outputs over threads, each reduction serial in its thread), for functions
    with one reduction, at most :data:`SMALL_REDUCTION` long. Not for chains of reductions
    (layer norm, softmax): Fallback gives each block a kernel of its own (3 dispatches per layer
    norm, each reduction in a single workgroup), where dlight's GeneralReduction makes one kernel
    with a workgroup per row."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc):
            return None
        extents = reduction_extents(func)
        if len(extents) != 1 or not 0 < extents[0] <= SMALL_REDUCTION:
            return None
        return super().apply(func, target, tunable)


def unit_reductions(func: Any) -> list[str]:
    """Names of the blocks of ``func`` that reduce over iterators of extent 1 only (``Linear(1, N)``'s
    matmul: K = 1)."""
    found: list[str] = []

    def visit(block: Any) -> None:
        extents = [iv.dom.extent for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if extents and all(isinstance(e, tirx.IntImm) and int(e.value) == 1 for e in extents):
            found.append(block.name_hint)

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)], order="post")
    return found


class _UnitReduction(GPUScheduleRule):
    """For functions with a unit reduction (:func:`unit_reductions`): every block keeps its own
    loop nest, its spatial loops fused and spread over workgroups of threads, its reduction loops
    (of extent 1) serial inside the thread, and its init. dlight's rules normalize such a function
    first, which drops the unit reduction iterator, and then inline the epilogue (a bias add) into
    both the init and the update: the bias added twice (:func:`broken_reductions`). Nothing is
    inlined here: a fused epilogue is a kernel of its own. Functions with more than one
    intermediate buffer are left alone (see :meth:`apply`): K = 1 matmuls and convolutions, with
    or without a fused epilogue, have one."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or not unit_reductions(func):
            return None
        root = func.body.block if isinstance(func.body, s_tir.SBlockRealize) else None
        if root is None or len(root.alloc_buffers) > 1:
            # With two intermediates or more, TVM's storage planner may reuse one in place for the
            # next (softmax or layer norm over a unit axis), which WebGPU cannot bind (read and
            # written in one dispatch): left to the other rules (such ops are then declined).
            return None
        threads = dl.base.max_threads_per_block(target)
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(block)
            kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
            if len(loops) != len(kinds):
                return None  # loops and iterators do not pair up as TE's computes lay them out
            spatial = [lp for lp, kind in zip(loops, kinds) if kind == tirx.IterVar.DataPar]
            reduce = [lp for lp, kind in zip(loops, kinds) if kind == tirx.IterVar.CommReduce]
            if len(spatial) + len(reduce) != len(loops):
                return None
            if not spatial:
                spatial = [sch.add_unit_loop(block)]
            sch.reorder(*spatial, *reduce)
            bx, tx = sch.split(sch.fuse(*spatial), factors=[None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        return sch


def broken_reductions(func: Any) -> list[str]:
    """Names of the blocks of a scheduled PrimFunc that keep a reduction's init but no longer
    update as ``C = C op e``. A reduction whose every iterator has extent 1 (``Linear(1, 1)``'s
    matmul, K = 1) loses its reduction iterator when dlight normalizes the function; dlight then
    treats the block as spatial and inlines an epilogue (the bias add) into both its init and its
    update, so the epilogue is applied twice. A schedule like that is refused: the next rule is
    tried (:class:`_UnitReduction`, last, schedules such functions correctly), and where none is
    left the op is declined with the reason (it runs elsewhere, correctly)."""
    bad: list[str] = []
    ops = (tirx.expr.Add, tirx.expr.Mul, tirx.expr.Max, tirx.expr.Min)

    def visit(block: Any) -> None:
        if block.init is None or any(iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars):
            return
        store = block.body
        if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, ops):
            return
        if not any(type(operand).__name__ == "BufferLoad" and operand.buffer.same_as(store.buffer)
                   and tvm.ir.structural_equal(list(operand.indices), list(store.indices))
                   for operand in (store.value.a, store.value.b)):
            bad.append(block.name_hint)

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, visit)], order="post")
    return bad


def unbound_stores(func: Any) -> list[str]:
    """Names of the blocks of a scheduled PrimFunc that store to a buffer outside every
    thread-bound loop: such a store would run on the host, so the schedule is unusable."""
    bad: list[str] = []

    def walk(stmt: Any, bound: bool, block: str) -> None:
        if stmt is None:
            return
        if isinstance(stmt, tirx.SeqStmt):
            for child in stmt:
                walk(child, bound, block)
        elif isinstance(stmt, tirx.For):
            walk(stmt.body, bound or stmt.kind == tirx.ForKind.THREAD_BINDING, block)
        elif isinstance(stmt, s_tir.SBlockRealize):
            walk(stmt.block, bound, block)
        elif isinstance(stmt, s_tir.SBlock):
            walk(stmt.init, bound, stmt.name_hint)
            walk(stmt.body, bound, stmt.name_hint)
        elif isinstance(stmt, tirx.BufferStore):
            if not bound and block not in bad:
                bad.append(block)
        elif isinstance(stmt, tirx.IfThenElse):
            walk(stmt.then_case, bound, block)
            walk(stmt.else_case, bound, block)
        elif hasattr(stmt, "body"):
            walk(stmt.body, bound, block)

    walk(func.body, False, "root")
    return bad


def schedule(func: Any, tgt: Any) -> tuple[Any | None, str]:
    """``(scheduled PrimFunc, "")`` from the first dlight rule whose schedule binds every store to
    GPU threads, or ``(None, why each rule failed)``."""
    notes = []
    for rule in _rules():
        name = type(rule).__name__
        try:
            space = rule.apply(func, tgt, False)
        except Exception as exc:  # a rule that crashes on this function is just not applicable
            notes.append(f"{name} raised {type(exc).__name__}")
            continue
        if space is None:
            continue
        sch = space[0] if isinstance(space, (list, tuple)) else space
        scheduled = sch.mod["main"]
        unbound = unbound_stores(scheduled)
        if unbound:
            notes.append(f"{name} left block(s) {', '.join(unbound[:3])} unbound to GPU threads")
            continue
        broken = broken_reductions(scheduled)
        if broken:
            notes.append(f"{name} inlined an epilogue into the init of unit reduction(s) {', '.join(broken[:3])}")
            continue
        return scheduled.with_attr("tirx.is_scheduled", True), ""
    return None, "; ".join(notes) or "no dlight GPU rule applies"


def schedule_module(mod: Any, tgt: Any) -> tuple[Any, dict[str, str]]:
    """Schedule every unscheduled PrimFunc of ``mod``; returns the module and ``{name: why}`` for
    the PrimFuncs no rule could schedule (left as they were)."""
    failed: dict[str, str] = {}
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        scheduled, why = schedule(func.with_attr("target", tgt) if "target" not in func.attrs else func, tgt)
        if scheduled is None:
            failed[gv.name_hint] = why
        else:
            updates[gv] = scheduled
    for gv, func in updates.items():
        mod[gv] = func
    return mod, failed


def relax_passes(fuse: bool, max_buffers: int | None = None, fold: bool = False) -> list[Any]:
    """Legalize to TIR calls, a concatenation of more tensors than ``max_buffers`` allows as a tree
    of concatenations within it (:func:`_concat_within`); with ``fuse``, TVM's FuseOps/FuseTIR,
    where a fused group binding more than ``max_buffers`` storage buffers is left unfused
    (:func:`_unfuse_over`). With ``fold``, the weights' transposes are computed when lowering
    (:func:`_transposed_weights`); the per-node checks leave them, so each node keeps its kernel."""
    split = {"relax.concat": _concat_within(max_buffers)} if max_buffers is not None and splits_concat(max_buffers) else None
    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps(split),
              relax.transform.AnnotateTIROpPattern()]
    if fold:
        passes.insert(1, tvm.transform.module_pass(lambda mod, _: _transposed_weights(mod), opt_level=0,
                                                   name="handoff.vulkan.TransposedWeights"))
    if fuse:
        passes.append(relax.transform.FuseOps())
        if max_buffers is not None:
            passes.append(tvm.transform.module_pass(lambda mod, _: _unfuse_over(mod, max_buffers), opt_level=0,
                                                    name="handoff.vulkan.UnfuseOverBudget"))
        passes.append(relax.transform.FuseTIR())
    return passes


def splits_concat(max_buffers: int) -> bool:
    """Whether :func:`relax_passes` lowers a concatenation of any length within ``max_buffers``
    storage buffers: each of its kernels needs two inputs and the output."""
    return max_buffers >= 3


def _concat_within(max_buffers: int) -> Callable[[Any, Any], Any]:
    """A legalization of ``relax.concat`` whose every kernel binds at most ``max_buffers`` storage
    buffers: TVM's own (one kernel reading every input) when the inputs and the output fit, else
    groups of ``max_buffers - 1`` inputs concatenated first, level by level, into intermediates
    that the last kernel concatenates. DenseNet concatenates every earlier layer's features (up
    to 33 tensors in torchvision's densenet121); declined at WebGPU's 8 buffers, those ``cat``
    nodes cut its vulkan program into 35 delegates with 34 on tvm between them."""
    legalize = tvm.ir.Op.get("relax.concat").get_attr("FLegalize")  # TVM's own, for each kernel

    def concat(bb: Any, call: Any) -> Any:
        tensors = call.args[0]
        if not isinstance(tensors, relax.Tuple) or len(tensors.fields) < max_buffers:
            return legalize(bb, call)
        fields = list(tensors.fields)
        while len(fields) >= max_buffers:  # with the output: over the budget
            groups = [fields[i:i + max_buffers - 1] for i in range(0, len(fields), max_buffers - 1)]
            fields = [g[0] if len(g) == 1 else bb.emit(legalize(bb, _concat_of(bb, call, g))) for g in groups]
        return legalize(bb, _concat_of(bb, call, fields))

    return concat


def _concat_of(bb: Any, call: Any, fields: list[Any]) -> Any:
    """``call`` (a ``relax.concat``) over ``fields`` instead of its own inputs, normalized."""
    return bb.normalize(relax.Call(call.op, [relax.Tuple(fields)], call.attrs))


@relax.expr_functor.mutator
class _Transposer(relax.PyExprMutator):
    def visit_call_(self, call: Any) -> Any:
        call = super().visit_call_(call)
        weight = call.args[0] if call.op.same_as(_PERMUTE_DIMS) else None
        if isinstance(weight, tvm.ir.GenericConst) and hasattr(weight.value, "numpy"):
            data = weight.value.numpy()  # float32, float16 or int32: what vulkan claims
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            return relax.const(np.ascontiguousarray(data.transpose(axes)), str(data.dtype))
        return call


_PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")


def _transposed_weights(mod: Any) -> Any:
    """Every ``permute_dims`` of a constant (the importer's transposed weight of each ``linear``)
    replaced by the transposed constant, so no kernel transposes a weight on every run (9 of the
    zoo transformer's 65 dispatches did). TVM's FoldConstant would too, but it compiles and runs
    every constant expression with LLVM: 64 s more to lower MobileNetV2 on the 2-core machine."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = _Transposer().visit_expr(func)
    return mod


def _unfuse_over(mod: Any, max_buffers: int) -> Any:
    """Inline back into their callers the fused groups (FuseOps' ``Primitive`` functions) whose
    tensor parameters + outputs exceed ``max_buffers``, so FuseTIR leaves their ops as kernels of
    their own; the other groups stay fused. (TVM's FuseOps takes a ``max_function_args`` only
    from Metal/OpenCL targets, not webgpu.)"""
    def tensors(ty: Any) -> int:
        if isinstance(ty, relax.TensorType):
            return 1
        return sum(tensors(f) for f in getattr(ty, "fields", ()))

    kept = []
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and func.attrs and "Primitive" in func.attrs:
            if sum(tensors(p.ty) for p in func.params) + tensors(func.ret_ty) <= max_buffers:
                mod[gv] = func.with_attr("global_symbol", gv.name_hint)  # public: not inlined below
                kept.append(gv)
    mod = relax.transform.InlinePrivateFunctions()(mod)
    for gv in kept:
        mod[gv] = mod[gv].without_attr("global_symbol")
    return mod


# -- TIR lowering and code generation -------------------------------------------------------------
@dataclasses.dataclass
class Kernel:
    name: str
    wgsl: str
    interface: wgsl.Interface
    params: list[str]  # "handle" or the scalar dtype, per device parameter


@dataclasses.dataclass
class Launch:
    """One ``call_ffi_kernel`` of a host function, still symbolic in the host's scalar parameters."""

    kernel: str
    args: list[tuple[str, Any]]  # ("param", index) | ("scratch", index) | ("scalar", tir expr)
    extents: dict[str, Any]  # launch tag -> tir expr
    lets: list[tuple[Any, Any]]  # host scalar bindings in scope of the launch


@dataclasses.dataclass
class HostFunc:
    params: list[tuple[str, Any]]  # ("buffer", Buffer var) | ("scalar", Var)
    scratch: list[tuple[int, str]]  # (bytes, dtype) of global allocations the host makes
    launches: list[Launch]


class _Snapshot:
    def __init__(self) -> None:
        self.mod = None


def lower_tir(prim_funcs: dict[str, Any], tgt: Any) -> tuple[dict[str, HostFunc], dict[str, Kernel]]:
    """Lower scheduled PrimFuncs (name -> func) to host launch plans and WGSL kernels."""
    mod = tvm.IRModule({tvm.ir.GlobalVar(name): func.with_attr("global_symbol", name)
                        for name, func in prim_funcs.items()})
    mod = tirx.transform.BindTarget(tgt.with_host(tgt.host))(mod)
    pipeline, _, finalize_device = tirx.get_default_tir_pipeline(tgt)
    snap = _Snapshot()

    @tvm.instrument.pass_instrument
    class _Take:
        def run_after_pass(self, m: Any, info: Any) -> None:
            if info.name == _SPLIT_PASS:
                snap.mod = m

    with tvm.transform.PassContext(instruments=[_Take()]):
        lowered = pipeline(mod)
    if snap.mod is None:
        raise LowerError(f"{TVM_NAME}'s TIR pipeline ran no {_SPLIT_PASS}: cannot read the launch plan")
    _, devices = split_host_device_mods(lowered)
    kernels: dict[str, Kernel] = {}
    build = tvm.get_global_func("target.build.webgpu")
    for dev_target, dev_mod in devices.items():
        dev_mod = finalize_device()(dev_mod)
        for gv, func in dev_mod.functions_items():
            name = str(func.attrs.get("global_symbol", gv.name_hint))
            try:
                source = build(tvm.IRModule({gv: func}), dev_target).inspect_source()
            except Exception as exc:
                raise LowerError(f"{TVM_NAME} WGSL code generation failed for kernel {name}: {tvm_message(exc)}",
                                 [name.removesuffix("_kernel")]) from exc
            source = wgsl.fix(source)
            try:
                iface = wgsl.interface(source)
            except wgsl.WgslError as exc:
                raise LowerError(f"kernel {name}: {exc}", [name]) from exc
            params = ["handle" if _is_pointer(p) else str(p.dtype) for p in func.params]
            kernels[name] = Kernel(name, source, iface, params)

    hosts = {}
    for gv, func in snap.mod.functions_items():
        if func.attrs.get("calling_conv", 0) == 2:  # a device kernel
            continue
        hosts[gv.name_hint] = _host_func(gv.name_hint, func, kernels)
    return hosts, kernels


def _is_pointer(var: Any) -> bool:
    return isinstance(getattr(var, "ty", None), tvm.ir.PointerType)


def _host_func(name: str, func: Any, kernels: dict[str, Kernel]) -> HostFunc:
    """Read the launch plan of one host function (see the module docstring)."""
    buffers: dict[int, tuple[str, int]] = {}  # buffer var -> ("param" | "scratch", index)
    params: list[tuple[str, Any]] = []
    for i, p in enumerate(func.params):
        if isinstance(getattr(p, "ty", None), tirx.BufferType):
            buffers[_key(p)] = ("param", i)
            params.append(("buffer", p))
        else:
            params.append(("scalar", p))
    scratch: list[tuple[int, str]] = []
    launches: list[Launch] = []
    lets: list[tuple[Any, Any]] = []  # host-side scalar bindings, in order

    def source(expr: Any) -> tuple[str, int]:
        if isinstance(expr, tvm.ir.Call) and expr.op.name == "tirx.buffer_data":
            expr = expr.args[0]
        ref = buffers.get(_key(expr))
        if ref is None:
            raise LowerError(f"host function {name}: kernel argument {expr} is not a buffer of the function", [name])
        return ref

    def walk(stmt: Any) -> None:
        if isinstance(stmt, tirx.SeqStmt):
            for child in stmt:
                walk(child)
        elif isinstance(stmt, tirx.DeclBuffer):
            if stmt.data is None:
                raise LowerError(f"host function {name}: buffer {stmt.buffer.name} declared without data", [name])
            buffers[_key(stmt.buffer)] = source(stmt.data)
        elif isinstance(stmt, tirx.AllocBuffer):
            buf = stmt.buffer
            if buf.scope() not in ("global", ""):
                raise LowerError(f"host function {name} allocates {buf.scope()} memory", [name])
            count = math.prod(_const_int(d, name) for d in buf.shape)
            buffers[_key(buf)] = ("scratch", len(scratch))
            scratch.append((count * _itemsize(str(buf.dtype), name), str(buf.dtype)))
        elif isinstance(stmt, tirx.AttrStmt):
            walk(stmt.body)
        elif isinstance(stmt, tirx.Bind):
            lets.append((stmt.var, stmt.value))
        elif isinstance(stmt, tirx.Evaluate):
            call = stmt.value
            if isinstance(call, tirx.IntImm):
                return
            if not isinstance(call, tvm.ir.Call) or call.op.name != "tirx.call_ffi_kernel":
                raise LowerError(f"host function {name} runs {call} on the host; only kernel launches are "
                                 f"supported", [name])
            launches.append(_launch(name, call, kernels, source, lets))
        else:
            raise LowerError(f"host function {name} has host-side {type(stmt).__name__}; only kernel launches "
                             f"are supported", [name])

    walk(func.body)
    return HostFunc(params, scratch, launches)


def _launch(name: str, call: Any, kernels: dict[str, Kernel], source: Callable[[Any], tuple[str, int]],
            lets: list[tuple[Any, Any]]) -> Launch:
    kname = str(call.args[0].value)
    kernel = kernels.get(kname)
    if kernel is None:
        raise LowerError(f"host function {name} launches {kname}, which has no WGSL", [name])
    nparams = len(kernel.params)
    args: list[tuple[str, Any]] = []
    for ptype, arg in zip(kernel.params, call.args[1:1 + nparams]):
        if ptype == "handle":
            args.append(source(arg))
        else:
            args.append(("scalar", arg))
    tags = [str(t) for t in call.attrs.launch_params]
    extents = list(call.args[1 + nparams:])
    if len(tags) != len(extents):
        raise LowerError(f"kernel {kname}: {len(tags)} launch tags but {len(extents)} extents", [name])
    return Launch(kname, args, dict(zip(tags, extents)), list(lets))


def _analyzer(bindings: Iterable[tuple[Any, Any]]) -> Any:
    """An arithmetic analyzer that knows the host's scalar bindings (evaluated in order)."""
    analyzer = sym.Analyzer()
    for var, value in bindings:
        analyzer.bind(var, analyzer.simplify(value))
    return analyzer


def _const_int(expr: Any, where: str, analyzer: Any = None) -> int:
    if not isinstance(expr, (int, tirx.IntImm)):
        expr = (analyzer or sym.Analyzer()).simplify(expr)
    if isinstance(expr, int):
        return expr
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    raise LowerError(f"{where}: {expr} is not a constant (dynamic shapes are not supported)", [where])


def _itemsize(dtype: str, where: str) -> int:
    if dtype not in DTYPES:
        raise LowerError(f"{where}: dtype {dtype} cannot be held in a WGSL storage buffer "
                         f"(supported: {', '.join(DTYPES)})", [where])
    return DTYPES[dtype][1]


# -- the launch plan ------------------------------------------------------------------------------
@dataclasses.dataclass
class _View:
    buffer: int
    offset: int
    nbytes: int
    shape: list[int]
    dtype: str

    def ref(self) -> list[int]:
        return [self.buffer, self.offset, self.nbytes]


class PlanBuilder:
    """Walks the memory-planned Relax ``main`` and expands each PrimFunc call into launches."""

    def __init__(self, hosts: dict[str, HostFunc], kernels: dict[str, Kernel]):
        self.hosts, self.kernels = hosts, kernels
        self.buffers: list[dict[str, Any]] = []
        self.weights = bytearray()
        self.values: dict[int, Any] = {}
        self.consts: dict[int, _View] = {}
        self.scratch: dict[tuple[str, int], int] = {}
        self.dispatches: list[dict[str, Any]] = []
        self.used_kernels: dict[str, int] = {}

    def _buffer(self, kind: str, nbytes: int, **extra: Any) -> int:
        if nbytes <= 0:
            raise LowerError(f"empty {kind} buffer: zero-element tensors are not supported")
        self.buffers.append({"kind": kind, "nbytes": int(nbytes), **extra})
        return len(self.buffers) - 1

    @staticmethod
    def _tensor_type(ty: Any, where: str) -> tuple[list[int], str]:
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise LowerError(f"{where}: {ty} is not a tensor of known shape")
        shape = [_const_int(d, where) for d in ty.shape.values]
        return shape, str(ty.dtype)

    def _nbytes(self, shape: list[int], dtype: str, where: str) -> int:
        return math.prod(shape) * _itemsize(dtype, where)

    def _const(self, const: Any) -> _View:
        view = self.consts.get(_key(const))
        if view is None:
            array = np.ascontiguousarray(const.value.numpy())
            dtype = str(array.dtype)
            nbytes = self._nbytes(list(array.shape), dtype, "weight")
            start = len(self.weights)
            self.weights += array.tobytes()
            self.weights += b"\0" * (-len(self.weights) % DATA_ALIGN)
            buf = self._buffer("weight", nbytes, data=[start, nbytes])
            view = _View(buf, 0, nbytes, list(array.shape), dtype)
            self.consts[_key(const)] = view
        return view

    def _value(self, expr: Any) -> Any:
        if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
            return self._const(expr)
        if isinstance(expr, relax.Tuple):
            return [self._value(f) for f in expr.fields]
        if isinstance(expr, relax.TupleGetItem):
            return self._value(expr.tuple_value)[expr.index]
        value = self.values.get(_key(expr))
        if value is None:
            raise LowerError(f"Relax value {expr} is used before it is defined, or is not a tensor")
        return value

    def build(self, main: Any) -> dict[str, Any]:
        inputs = []
        for param in main.params:
            shape, dtype = self._tensor_type(param.ty, f"input {param.name}")
            nbytes = self._nbytes(shape, dtype, f"input {param.name}")
            view = _View(self._buffer("input", nbytes, index=len(inputs)), 0, nbytes, shape, dtype)
            self.values[_key(param)] = view
            inputs.append({"buffer": view.buffer, "shape": shape, "dtype": dtype})
        body = main.body
        for block in body.blocks:
            for binding in block.bindings:
                self.values[_key(binding.var)] = self._binding(binding)
        result = self._value(body.body)
        flat = []

        def flatten(v: Any) -> None:
            if isinstance(v, list):
                for item in v:
                    flatten(item)
            else:
                flat.append(v)

        flatten(result)
        outputs = [{"buffer": v.buffer, "offset": v.offset, "nbytes": v.nbytes, "shape": v.shape, "dtype": v.dtype}
                   for v in flat]
        order = sorted(self.used_kernels, key=self.used_kernels.get)
        kernels = [{"name": k, "wgsl": self.kernels[k].wgsl, "workgroup_size": list(self.kernels[k].interface.workgroup_size),
                    "bindings": [access for access, _ in self.kernels[k].interface.storage],
                    "binding_types": [ty for _, ty in self.kernels[k].interface.storage],
                    "pods": self.kernels[k].interface.pods} for k in order]
        for d in self.dispatches:
            d["kernel"] = order.index(d["kernel"])
        return {"inputs": inputs, "outputs": outputs, "buffers": self.buffers, "kernels": kernels,
                "dispatches": self.dispatches, "limits": self._limits(kernels)}

    def _limits(self, kernels: list[dict[str, Any]]) -> dict[str, int]:
        largest_binding = max([b["nbytes"] for b in self.buffers] or [0])
        return {
            "max_storage_buffers_per_shader_stage": max([len(k["bindings"]) for k in kernels] or [0]),
            "max_storage_buffer_binding_size": largest_binding,
            "max_buffer_size": largest_binding,
            "max_compute_invocations_per_workgroup": max([math.prod(k["workgroup_size"]) for k in kernels] or [1]),
            "max_compute_workgroup_size_x": max([k["workgroup_size"][0] for k in kernels] or [1]),
            "max_compute_workgroup_size_y": max([k["workgroup_size"][1] for k in kernels] or [1]),
            "max_compute_workgroup_size_z": max([k["workgroup_size"][2] for k in kernels] or [1]),
            "max_compute_workgroups_per_dimension": max([max(d["grid"][1], min(d["grid"][0], MAX_GRID_DIM))
                                                         for d in self.dispatches] or [1]),
        }

    def _binding(self, binding: Any) -> Any:
        value = binding.value
        where = f"Relax binding {binding.var.name}"
        if isinstance(value, (tvm.ir.GenericConst, relax.Tuple, relax.TupleGetItem, tvm.ir.Var)):
            return self._value(value)
        if not isinstance(value, relax.Call):
            raise LowerError(f"{where}: unsupported Relax expression {type(value).__name__}")
        op = value.op
        if isinstance(op, tvm.ir.GlobalVar):
            return self._call(op.name_hint, value.args, where)
        name = getattr(op, "name", str(op))
        if name == "relax.memory.alloc_storage":
            size = _const_int(value.args[0].values[0], where)
            return ("storage", self._buffer("intermediate", size))
        if name == "relax.memory.alloc_tensor":
            storage = self._value(value.args[0])
            offset = _const_int(value.args[1], where)
            shape = [_const_int(d, where) for d in value.args[2].values]
            dtype = str(value.args[3].value)
            if offset % DATA_ALIGN:
                raise LowerError(f"{where}: tensor at offset {offset} of its storage, not a multiple of {DATA_ALIGN}")
            return _View(storage[1], offset, self._nbytes(shape, dtype, where), shape, dtype)
        if name == "relax.builtin.alloc_tensor":
            shape = [_const_int(d, where) for d in value.args[0].values]
            dtype = str(value.args[1].value)
            nbytes = self._nbytes(shape, dtype, where)
            return _View(self._buffer("intermediate", nbytes), 0, nbytes, shape, dtype)
        if name == "relax.reshape":
            src = self._value(value.args[0])
            shape, dtype = self._tensor_type(binding.var.ty, where)
            return _View(src.buffer, src.offset, src.nbytes, shape, dtype)
        if name in ("relax.memory.kill_storage", "relax.memory.kill_tensor"):
            return None
        raise LowerError(f"{where}: {TVM_NAME} has no GPU kernel for Relax op {name} (it was not legalized)")

    def _call(self, func: str, args: Any, where: str) -> None:
        host = self.hosts.get(func)
        if host is None:
            raise LowerError(f"{where} calls {func}, which was not lowered", [func])
        if len(args) != len(host.params):
            raise LowerError(f"{where}: {func} takes {len(host.params)} arguments, the call passes {len(args)}", [func])
        views: list[_View | None] = []
        scalars: list[tuple[Any, Any]] = []
        for (kind, param), arg in zip(host.params, args):
            if kind == "buffer":
                view = self._value(arg)
                if not isinstance(view, _View):
                    raise LowerError(f"{where}: argument {arg} of {func} is not a tensor", [func])
                views.append(view)
            else:
                views.append(None)
                scalars.append((param, arg))
        for launch in host.launches:
            kernel = self.kernels[launch.kernel]
            analyzer = _analyzer([*scalars, *launch.lets])
            refs, pods = [], []
            for (kind, ref), ptype in zip(launch.args, kernel.params):
                if kind == "param":
                    refs.append(views[ref].ref())
                elif kind == "scratch":
                    key = (func, ref)
                    if key not in self.scratch:
                        self.scratch[key] = self._buffer("intermediate", host.scratch[ref][0])
                    buf = self.scratch[key]
                    refs.append([buf, 0, self.buffers[buf]["nbytes"]])
                else:
                    pods.append(_scalar(ref, ptype, analyzer, where))
            if len(refs) != len(kernel.interface.storage):
                raise LowerError(f"kernel {launch.kernel}: host passes {len(refs)} buffers, WGSL binds "
                                 f"{len(kernel.interface.storage)}", [func])
            if [t for t, _ in pods] != kernel.interface.pods:
                raise LowerError(f"kernel {launch.kernel}: host passes scalars {[t for t, _ in pods]}, WGSL "
                                 f"declares {kernel.interface.pods}", [func])
            self._check_aliasing(launch.kernel, refs, kernel, func)
            grid = _grid(launch, kernel, analyzer, where)
            self.used_kernels.setdefault(launch.kernel, len(self.used_kernels))
            self.dispatches.append({"kernel": launch.kernel, "buffers": refs, "pods": pods, "grid": grid})
        return None

    def _check_aliasing(self, kname: str, refs: list[list[int]], kernel: Kernel, func: str) -> None:
        """A buffer written by a dispatch may not be bound twice in it (WebGPU forbids writable
        storage aliasing); the memory planner never does this, so it would be a bug here."""
        seen: dict[int, str] = {}
        for (buf, _, _), (access, _) in zip(refs, kernel.interface.storage):
            if buf in seen and "read_write" in (access, seen[buf]):
                raise LowerError(f"kernel {kname} binds buffer {buf} twice, once writable", [func])
            seen[buf] = access if seen.get(buf) != "read_write" else "read_write"


def _scalar(expr: Any, ptype: str, analyzer: Any, where: str) -> list[Any]:
    expr = analyzer.simplify(expr)
    wgsl_type = {"int32": "i32", "uint32": "u32", "float32": "f32"}.get(ptype)
    if wgsl_type is None:
        raise LowerError(f"{where}: scalar kernel argument of dtype {ptype}")
    if isinstance(expr, tirx.IntImm):
        return [wgsl_type, int(expr.value)]
    if isinstance(expr, tirx.FloatImm):
        return [wgsl_type, float(expr.value)]
    raise LowerError(f"{where}: scalar kernel argument {expr} is not a constant")


def _grid(launch: Launch, kernel: Kernel, analyzer: Any, where: str) -> list[int]:
    """The logical grid ``[x, y]`` of a launch, checked against the kernel's workgroup size."""
    ext = {tag: _const_int(expr, where, analyzer) for tag, expr in launch.extents.items()}
    if "blockIdx.z" in ext:
        raise LowerError(f"kernel {launch.kernel} uses blockIdx.z, which the WGSL ABI reserves for wide grids")
    grid = [ext.get("blockIdx.x", 1), ext.get("blockIdx.y", 1)]
    threads = [ext.get(f"threadIdx.{a}", 1) for a in "xyz"]
    if tuple(threads) != kernel.interface.workgroup_size:
        raise LowerError(f"kernel {launch.kernel}: host launches {threads} threads, WGSL has workgroup size "
                         f"{list(kernel.interface.workgroup_size)}")
    if grid[1] > MAX_GRID_DIM:
        raise LowerError(f"kernel {launch.kernel}: grid y {grid[1]} exceeds {MAX_GRID_DIM} workgroups")
    return grid
