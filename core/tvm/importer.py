"""What TVM's Relax importer for ``torch.export`` can take, shared by every backend that imports
partitions with it (the built-in ``tvm`` backend, and plugins that generate code with TVM, such
as ``vulkan``). Imports torch and TVM.
"""

from __future__ import annotations

import functools
import operator
import sys
from types import FrameType
from typing import Any, Iterator

import torch
import tvm
from torch.fx.operator_schemas import normalize_function
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from handoff import LoweringError, quantized_dtype

#: "TVM 0.27", for messages.
TVM_NAME = "TVM " + ".".join(tvm.__version__.split(".")[:2])


@functools.cache
def _converters() -> frozenset[str]:
    """Keys of the importer's converter table: ``OpOverload.__name__`` ("conv2d.default") for ATen
    ops, ``__name__`` for Python callables ("getitem", "add" on SymInts, "cond")."""
    return frozenset(k for k in ExportedProgramImporter().convert_map if isinstance(k, str))


@functools.cache
def _dtype_supported(dtype: torch.dtype) -> bool:
    try:
        ExportedProgramImporter._convert_data_type(dtype)
        return True
    except NotImplementedError:
        return False


def decline_reason(node: torch.fx.Node) -> str | None:
    """``None`` when the Relax importer converts ``node``, else why not."""
    target = node.target
    if target is operator.getitem:
        return None  # the core keeps every getitem with its producer
    if isinstance(target, torch._ops.OpOverload):
        shown = f"{target.namespace}.{target.__name__}"
        if target.namespace == "quantized_decomposed":
            return _quantize_reason(node, shown)
        # The table is keyed without namespace: only ATen ops are what its names mean.
        if target.namespace != "aten":
            return f"{TVM_NAME} Relax importer converts ATen ops only, not {shown}"
    else:
        shown = getattr(target, "__name__", repr(target))
    if getattr(target, "__name__", None) not in _converters():
        return f"{TVM_NAME} Relax importer has no converter for {shown}"
    for value in [node.meta.get("val"), *(n.meta.get("val") for n in node.all_input_nodes)]:
        for leaf in torch.utils._pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and not _dtype_supported(leaf.dtype):
                return f"dtype {str(leaf.dtype).removeprefix('torch.')} not supported by the {TVM_NAME} Relax importer"
    check = _ARGUMENT_CHECKS.get(target.__name__)
    return check(node) if check else None


def _antialiased_downsampling(node: torch.fx.Node) -> str | None:
    # The converter resizes with plain bilinear; antialiasing changes results only when shrinking.
    before, after = node.args[0].meta.get("val"), node.meta.get("val")
    if before is None or after is None or any(a < b for a, b in zip(after.shape[2:], before.shape[2:])):
        return f"antialiased downsampling: the {TVM_NAME} Relax importer resizes without antialiasing (wrong results)"
    return None


def _finished_frames(exc: BaseException) -> Iterator[FrameType]:
    """The frames of ``exc``'s traceback that have returned, outermost first. The running ones (the
    caller's) are left out: reading a running frame's ``f_locals`` leaves a snapshot of its locals,
    ``exc`` included, on it, which would keep everything the traceback holds alive with it."""
    running, frame = set(), sys._getframe()
    while frame is not None:
        running.add(id(frame))
        frame = frame.f_back
    tb = exc.__traceback__
    while tb is not None:
        if id(tb.tb_frame) not in running:
            yield tb.tb_frame
        tb = tb.tb_next


def failing_node(exc: BaseException) -> str | None:
    """The node the importer was converting when ``exc`` was raised: the ``node`` local of the
    outermost frame that has one (the importer's loop over the graph), if any."""
    for frame in _finished_frames(exc):
        node = frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node) and node.op == "call_function":
            return node.name
    return None


def _close_builder(exc: BaseException) -> None:
    """End the blocks a failed import left open in its importer's BlockBuilder (TVM's
    FunctionScope does not end them when its body raises). Otherwise TVM's C++ destructor logs
    "BlockBuilder destroyed with remaining blocks!" on stderr whenever the garbage collector gets
    to the importer (it lives in reference cycles): on the user's terminal, long after the error.
    Scopes are left alone: they do not warn, and ``end_scope`` on none segfaults in TVM 0.27."""
    builder = next((frame.f_locals["self"].block_builder for frame in _finished_frames(exc)
                    if isinstance(frame.f_locals.get("self"), ExportedProgramImporter)), None)
    for _ in range(64 if builder is not None else 0):  # one or two are open
        try:
            builder._end_block()
        except Exception:  # TVM's check "no block is being built": all ended
            break


def io_spec(ty: Any) -> dict[str, Any]:
    """``{"shape": [...], "dtype": ...}`` of a Relax tensor type (symbolic dims as text)."""
    if ty.shape is None:  # rank known, extents not
        return {"shape": None, "dtype": str(ty.dtype)}
    shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values]
    return {"shape": shape, "dtype": str(ty.dtype)}


# -- PT2E quantize/dequantize ops -------------------------------------------------------------------
# The Relax importer converts ATen ops only. A PT2E-quantized graph wraps each op in
# ``quantized_decomposed`` quantize/dequantize ops; these converters import them as Relax integer
# arithmetic with torch's own formulas (``torch/ao/quantization/fx/_decomposed.py``), so a tvm
# partition computes int8 -> dequantize -> fp32 kernel -> quantize -> int8 and matches the
# quantized eager model to the rounding step: Relax has no integer conv/matmul kernels that its
# importer targets, so the ops between run in fp32 (a backend says so with :data:`INT8_COMPUTE`).

#: How a partition holding quantize/dequantize ops computes on TVM (for delegate metadata).
INT8_COMPUTE = "dequantize-compute-quantize: integer (int8, uint8, 16-bit) tensors between ops, fp32 kernels (Relax has no integer kernels)"
_INT_DTYPES = {torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16", torch.uint16: "uint16",
               torch.int32: "int32"}


def _quantize_reason(node: torch.fx.Node, shown: str) -> str | None:
    if node.target.__name__ not in _QUANTIZE_CONVERTERS:
        return f"{TVM_NAME}: handoff imports quantize/dequantize ops but not {shown}"
    dtype = quantized_dtype(node)
    if dtype not in _INT_DTYPES:
        return f"{shown} with dtype {dtype}: handoff imports {'/'.join(_INT_DTYPES.values())} quantization only"
    if node.kwargs.get("out_dtype") not in (None, torch.float32):
        return f"{shown} with out_dtype {node.kwargs['out_dtype']}: only float32 is imported"
    return None


def _operand(importer: Any, value: Any, dtype: str) -> Any:
    """A scale or zero point: an imported tensor (``.tensor`` overloads, per-channel) or a constant."""
    if isinstance(value, torch.fx.Node):
        return importer.block_builder.emit(relax.op.astype(importer.env[value], dtype))  # zero points: int64
    return relax.const(value, dtype)


def _per_channel(importer: Any, expr: Any, axis: int, ndim: int) -> Any:
    """A 1-D per-channel parameter shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return importer.block_builder.emit(relax.op.reshape(expr, shape))


def _arguments(node: torch.fx.Node) -> dict[str, Any]:
    """A quantize/dequantize node's arguments by schema name (``per_tensor`` names its parameters
    ``scale``/``zero_point``, ``per_channel`` ``scales``/``zero_points`` with an ``axis``), bound
    once: ``dtype`` is the integer dtype :func:`handoff.quantized_dtype` reads the same way."""
    bound = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    args = bound.kwargs
    return {"input": args["input"], "scale": args.get("scale", args.get("scales")),
            "zero_point": args.get("zero_point", args.get("zero_points")), "axis": args.get("axis"),
            "quant_min": args["quant_min"], "quant_max": args["quant_max"], "dtype": args.get("dtype")}


def _quantize(node: torch.fx.Node, importer: Any) -> Any:
    a = _arguments(node)
    x = importer.env[a["input"]]
    ndim = len(a["input"].meta["val"].shape)
    scale, zero = _operand(importer, a["scale"], "float32"), _operand(importer, a["zero_point"], "float32")
    if a["axis"] is not None:
        scale, zero = (_per_channel(importer, e, a["axis"], ndim) for e in (scale, zero))
    bb = importer.block_builder
    inv = bb.emit(relax.op.divide(relax.const(1.0, "float32"), scale))
    q = bb.emit(relax.op.add(relax.op.round(relax.op.multiply(x, inv)), zero))
    clipped = relax.op.clip(q, float(a["quant_min"]), float(a["quant_max"]))
    return bb.emit(relax.op.astype(clipped, _INT_DTYPES[a["dtype"]]))


def _dequantize(node: torch.fx.Node, importer: Any) -> Any:
    a = _arguments(node)
    x = importer.env[a["input"]]
    ndim = len(a["input"].meta["val"].shape)
    scale = _operand(importer, a["scale"], "float32")
    zero = None if a["zero_point"] is None else _operand(importer, a["zero_point"], "float32")
    if a["axis"] is not None:
        scale = _per_channel(importer, scale, a["axis"], ndim)
        zero = None if zero is None else _per_channel(importer, zero, a["axis"], ndim)
    bb = importer.block_builder
    xf = bb.emit(relax.op.astype(x, "float32"))
    if zero is not None:
        xf = bb.emit(relax.op.subtract(xf, zero))
    return bb.emit(relax.op.multiply(xf, scale))


# -- converters that replace TVM's own where it computes wrongly --------------------------------

def _select(node: torch.fx.Node, importer: Any) -> Any:
    """``aten.select.int`` with its index made non-negative. TVM 0.27's converter hands the index
    to ``relax.op.take`` as it is, in take's default ``fast`` mode, which does not wrap: ``x[:, -1]``
    reads out of bounds (garbage such as 6e35, or a crash). The extent is static here (the importer
    runs on static shapes); a symbolic one is indexed in ``wrap`` mode. The index is an int32
    constant where it fits: WGSL has no 64-bit integers, and the vulkan backend, which imports
    with these converters, built no kernel for an int64 one (36 of swin_t's ``select`` nodes)."""
    x = importer.env[node.args[0]]
    shape = node.args[0].meta["val"].shape
    dim = node.args[1] % len(shape)
    index, mode = node.args[2], "fast"
    if index < 0:
        extent = shape[dim]
        if isinstance(extent, int):
            index += extent
        else:
            mode = "wrap"
    const = relax.const(index, "int32" if abs(index) < 2**31 else "int64")
    return importer.block_builder.emit(relax.op.take(x, const, dim, mode=mode))


_QUANTIZE_CONVERTERS = {
    "quantize_per_tensor.default": _quantize, "quantize_per_tensor.tensor": _quantize,
    "quantize_per_channel.default": _quantize,
    "dequantize_per_tensor.default": _dequantize, "dequantize_per_tensor.tensor": _dequantize,
    "dequantize_per_channel.default": _dequantize,
}


# -- half-precision accumulation ------------------------------------------------------------------
# TVM 0.27's converters for aten.convolution (``BaseFXGraphImporter._convolution``), addmm, mm,
# bmm, matmul and linear emit the product with ``out_dtype="float32"`` whatever the inputs' dtype,
# and addmm/convolution then add the bias in the input's dtype: an fp16 or bf16 op with a bias fails
# to import ("R.add ... float32 vs float16"), one without returns float32 where eager returns the
# input's dtype, and a float64 or int32 product comes back float32. baddbmm's converter, the other
# way round, accumulates half precision in half precision. handoff's converters share one rule,
# :func:`_accumulated`: half precision accumulates in float32 (as eager PyTorch does on CPU), the
# bias is scaled and added there, and the result is rounded once to the node's dtype; every other
# dtype computes in its own.

_HALF = ("float16", "bfloat16")


def _node_dtype(node: torch.fx.Node) -> str:
    return str(node.meta["val"].dtype).removeprefix("torch.")


def _accumulated(node: torch.fx.Node, importer: Any, product: Any, bias: Any = None, alpha: float = 1,
                 beta: float = 1) -> Any:
    """``alpha * product(out_dtype) + beta * bias`` as ``node`` computes it: ``product`` emits the
    op with the accumulation dtype as its ``out_dtype``; ``bias`` (a Relax expression broadcasting
    to the product, or ``None``) is added in that dtype; the sum is rounded once to the node's dtype.
    A ``beta`` of 0 ignores the bias (NaN and infinity in it too), as torch does."""
    dtype = _node_dtype(node)
    accumulate = "float32" if dtype in _HALF else dtype
    bb = importer.block_builder
    out = bb.emit(product(accumulate))
    if alpha != 1:
        out = bb.emit(relax.op.multiply(out, relax.const(alpha, accumulate)))
    if bias is not None and beta != 0:
        if bias.ty.dtype != accumulate:
            bias = bb.emit(relax.op.astype(bias, accumulate))
        if beta != 1:
            bias = bb.emit(relax.op.multiply(bias, relax.const(beta, accumulate)))
        out = bb.emit(relax.op.add(out, bias))
    return out if accumulate == dtype else bb.emit(relax.op.astype(out, dtype))


#: (transposed, input rank) -> (Relax op, data layout, kernel layout), as aten.convolution lays them.
_CONVOLUTIONS = {
    (False, 3): (relax.op.nn.conv1d, "NCW", "OIW"),
    (False, 4): (relax.op.nn.conv2d, "NCHW", "OIHW"),
    (False, 5): (relax.op.nn.conv3d, "NCDHW", "OIDHW"),
    (True, 3): (relax.op.nn.conv1d_transpose, "NCW", "IOW"),
    (True, 4): (relax.op.nn.conv2d_transpose, "NCHW", "IOHW"),
}


def _convolution_reason(node: torch.fx.Node) -> str | None:
    transposed, rank = node.args[6], len(node.args[0].meta["val"].shape)
    if (transposed, rank) not in _CONVOLUTIONS:
        kind = "transposed convolution" if transposed else "convolution"
        return f"{TVM_NAME}: a {kind} of a rank-{rank} input; the Relax importer has 1-D and 2-D transposed, 1-D to 3-D other ones"
    return None


def _convolution(node: torch.fx.Node, importer: Any) -> Any:
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = importer.retrieve_args(node)
    rank = len(node.args[0].meta["val"].shape)
    op, data_layout, kernel_layout = _CONVOLUTIONS[transposed, rank]
    extra = {"output_padding": output_padding} if transposed else {}
    if bias is not None:
        bias = importer.block_builder.emit(relax.op.reshape(bias, [1, -1] + [1] * (rank - 2)))
    return _accumulated(node, importer, lambda out_dtype: op(
        x, weight, strides=stride, padding=padding, dilation=dilation, groups=groups, data_layout=data_layout,
        kernel_layout=kernel_layout, out_dtype=out_dtype, **extra), bias)


def _matmul(node: torch.fx.Node, importer: Any) -> Any:
    """``aten.mm``, ``bmm`` and ``matmul``."""
    a, b = importer.retrieve_args(node)[:2]
    return _accumulated(node, importer, lambda out_dtype: relax.op.matmul(a, b, out_dtype=out_dtype))


def _addmm(node: torch.fx.Node, importer: Any) -> Any:
    """``aten.addmm`` and ``baddbmm``: ``beta * input + alpha * (a @ b)``."""
    bias, a, b = importer.retrieve_args(node)[:3]
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    return _accumulated(node, importer, lambda out_dtype: relax.op.matmul(a, b, out_dtype=out_dtype), bias,
                        alpha=alpha, beta=beta)


def _linear(node: torch.fx.Node, importer: Any) -> Any:
    """``aten.linear``: ``x @ weight.T + bias``."""
    args = importer.retrieve_args(node)
    x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
    return _accumulated(node, importer, lambda out_dtype: relax.op.linear(x, weight, None, out_dtype), bias)


_ACCUMULATING_CONVERTERS = {
    "convolution.default": _convolution, "mm.default": _matmul, "bmm.default": _matmul, "matmul.default": _matmul,
    "addmm.default": _addmm, "baddbmm.default": _addmm, "linear.default": _linear,
}


#: Converters handoff puts in place of (or next to) the importer's own, by converter-table key (see
#: each function for the importer's bug it avoids).
_CONVERTERS = {**_QUANTIZE_CONVERTERS, **_ACCUMULATING_CONVERTERS, "select.int": _select}

#: Converters that exist but fail or give wrong results for some arguments, by converter-table key.
_ARGUMENT_CHECKS = {"_upsample_bilinear2d_aa.default": _antialiased_downsampling, "convolution.default": _convolution_reason}


def converters() -> dict[str, Any]:
    """handoff's converters, by converter-table key ("addmm.default"), in the form TVM's importer
    takes as ``custom_convert_map`` (``fn(node, importer) -> relax.Var``): what
    :func:`import_partition` passes to ``from_exported_program``. A backend that drives TVM's
    ``ExportedProgramImporter`` itself installs these over the importer's own table (each bound to
    that importer), so that it imports exactly as the ``tvm`` backend does."""
    return dict(_CONVERTERS)


def import_partition(ep: Any) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """``(Relax module, input specs, output specs)`` of one partition's ExportedProgram.

    :raises LoweringError: naming the node the importer failed on, when it can tell.
    """
    try:
        # Already core ATen: decomposing again would retrace and rename the nodes that
        # LoweringError.node refers to.
        mod = from_exported_program(ep, run_ep_decomposition=False, custom_convert_map=converters())
    except Exception as exc:
        node = failing_node(exc)
        _close_builder(exc)
        where = f" at node {node}" if node else ""
        raise LoweringError(f"{TVM_NAME} Relax importer failed{where}: {tvm_message(exc)}", node=node) from exc
    main = mod["main"]
    ret = main.ret_ty
    outputs = [io_spec(f) for f in ret.fields] if isinstance(ret, relax.TupleType) else [io_spec(ret)]
    return mod, [io_spec(p.ty) for p in main.params], outputs


def tvm_message(exc: BaseException) -> str:
    """A TVM error in one line: the failed check when there is one (TVM's messages end with it),
    else the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Check failed" in line or "Error" in line:
            return line[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]
