"""What QNN HTP (QNN SDK 2.51 through onnxruntime-qnn 2.7.0) compiles, per core ATen op.

Capability is data here, and every claim is checked: ``tools/check_op_table.py`` compiles a
one-op graph for every entry (and for the constraint cases it declines) through the real path,
``torch.onnx.export`` -> the QNN EP with CPU fallback disabled, runs it on the HTP emulator and
compares with eager torch; a claim must compile *and* match (1e-4 relative for fp32, 1e-2 for
fp16), a decline must fail one of the two. The table is checked for both arithmetic modes:
``precision=fp32`` (no ``soc_model``) and ``precision=fp16`` (with one). Findings behind it:

* HTP's fp32 kernel set is a subset of its fp16 one. ``gelu``, ``elu``, ``round``, ``atan``,
  ``cumsum``, ``group_norm``, ``embedding``/``index_select``/``gather``, floor division and
  ``remainder``, and ``where`` on float data fail to finalize in fp32
  (``QNN_COMMON_ERROR_MEM_ALLOC``); so do 3-d convolution and strided ``slice``. Those are
  claimed for fp16 arithmetic only (``precision=fp16``, or float16 tensors).
* ``native_layer_norm`` compiles in fp32 but computes in reduced precision (4e-4 relative
  error), so it is claimed for fp16 arithmetic only.
* fp32 ``max_pool2d`` with padding (pads with 0, not -inf) or ``ceil_mode`` gives wrong
  results; the fp16 kernels are right. ``avg_pool2d`` with ``ceil_mode`` is wrong in both.
* Rounding ops (``floor``, ``ceil``, ``trunc``, ``round``, floor division, ``remainder``) on
  float32 data are declined with ``precision=fp16``: converting the input to fp16 moves values
  within 1e-3 of an integer onto it, which flips results by a whole unit.
* int64: the QNN EP narrows int64 graph tensors to int32, silently wrapping values beyond
  2**31 (``x + 3`` with ``x = 2**33`` gives 3). A node touching an int64 *data* tensor is
  declined; int64 *indices* (argmax results, the index of ``x[i]``) are allowed, since valid ones
  are bounded by a dimension size. float64 has no HTP type at all.
* Tensors of rank > 5 are refused by the QNN EP.

int8 (``--quantize int8``): PT2E quantize/dequantize ops are claimed by HTP's QDQ rules
(:func:`_qdq_reason`: per-tensor uint8/int8/uint16/int16 activations, per-channel int8 weights,
int32 biases) and become ONNX QuantizeLinear/DequantizeLinear; an op inside a dequantize -> op ->
quantize group (:func:`in_qdq_unit`) runs on HTP's integer kernels, so its fp32-only decline does
not apply. With 16-bit activations HTP is pickier about the other operands' encodings (measured on
the emulator): MatMul refuses uint16 by int16, LayerNorm refuses any scale but uint8; both are
declined here with the reason (:func:`_matmul`, :func:`_layer_norm`), and handoff's quantizer
(:mod:`handoff_qnn.quantizer`) annotates them in encodings HTP takes. These are checked through the zoo models on the emulator (``tests/test_int8.py``), not
yet by ``tools/check_op_table.py``.

Op *combinations* can still fail where each op compiles alone (fp32 MatMul fed by Div, Exp,
Sqrt or Reciprocal); :class:`handoff_qnn.compiler.QnnCompiler` checks those in context.

Imports torch: used by the compiler and the check tool only.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Mapping

import torch

from ._format import Target

FLOAT = frozenset({"float32", "float16"})
FLOAT_BOOL = FLOAT | {"bool"}
FLOAT_INT32 = FLOAT | {"int32"}
#: Data movement: values are copied, never computed on.
ANY = frozenset({"float32", "float16", "int32", "bool"})
COMPARE = FLOAT | {"int32", "bool"}
LOGICAL = frozenset({"bool"})
MAX_RANK = 5

_ROUNDING = ("{op} rounds: computing it in fp16 on float32 data (precision=fp16) flips results near integers "
             "(measured 8e-2 error); keep precision=fp32 or feed float16 tensors")
_FP32_MISSING = "QNN HTP has no fp32 kernel for {op} (it has an fp16 one): compile with --option qnn.precision=fp16"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A supported op and its constraints.

    :param onnx: the ONNX op(s) ``torch.onnx`` lowers it to (documentation).
    :param dtypes: dtypes allowed for every tensor the node reads or (used) outputs produce.
    :param outputs: how many of a multi-output op's results QNN can produce (the rest must be unused).
    :param fp32: when set, the op is claimed only with fp16 arithmetic (or int8: inside a
        dequantize -> op -> quantize group, :func:`in_qdq_unit`); this is the reason otherwise.
    :param check: further constraint, ``(node, fp16) -> reason or None``; ``fp16`` is whether the
        target computes in fp16 (``precision=fp16``).
    :param fp16_inexact: when set, declined for ``precision=fp16`` on float32 data: the op is
        discontinuous (rounding), so converting its input to fp16 flips results by whole units.
    :param index_args: positions of arguments that are index tensors (a tensor or a list of
        them): int64 is allowed there, since valid indices are bounded by a dimension size and
        survive the QNN EP's narrowing to int32.
    :param index_outputs: output positions that are indices (int64 allowed, same argument).
    """

    onnx: str
    dtypes: frozenset[str] = FLOAT
    outputs: int = 1
    fp32: str | None = None
    check: Callable[[torch.fx.Node, bool], str | None] | None = None
    fp16_inexact: str | None = None
    index_args: tuple[int, ...] = ()
    index_outputs: tuple[int, ...] = ()


# -- constraint checks ---------------------------------------------------------------------------
def _arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else None


def _rank(x: Any) -> int:
    v = _val(x)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _conv(node: torch.fx.Node, fp16: bool) -> str | None:
    rank = _rank(node.args[0])
    if rank == 5 and not fp16:
        return ("QNN HTP has no fp32 kernel for 3-d convolution (it has an fp16 one): compile with "
                "--option qnn.precision=fp16")
    if rank not in (3, 4, 5):
        return f"{rank - 2}-d convolution is not supported on QNN HTP (1-d, 2-d and 3-d only)"
    return None


def _pool_common(node: torch.fx.Node, fp16: bool, kind: str, padding_index: int | None, ceil_index: int) -> str | None:
    if _rank(node.args[0]) != 4:
        return f"{kind} on a rank-{_rank(node.args[0])} input is not supported (batched NCHW only)"
    if padding_index is not None and any(_arg(node, padding_index, "padding", [0]) or [0]) and not fp16:
        return (f"{kind} with padding gives wrong results with QNN HTP's fp32 kernel (it pads with 0, not -inf); "
                f"its fp16 kernel is right: --option qnn.precision=fp16")
    if _arg(node, ceil_index, "ceil_mode", False) and (not fp16 or kind == "avg_pool2d"):
        return f"{kind} with ceil_mode=True gives wrong results on QNN HTP" + (
            "" if kind == "avg_pool2d" else " in fp32 (its fp16 kernel is right: --option qnn.precision=fp16)")
    return None


def _max_pool(node: torch.fx.Node, fp16: bool) -> str | None:
    dilation = _arg(node, 4, "dilation", [1]) or [1]
    if any(d != 1 for d in dilation):
        return "max_pool2d with dilation is not supported by the QNN EP"
    return _pool_common(node, fp16, "max_pool2d", 3, 5)


def _avg_pool(node: torch.fx.Node, fp16: bool) -> str | None:
    if _arg(node, 6, "divisor_override", None) is not None:
        return "avg_pool2d with divisor_override is not supported by the QNN EP"
    return _pool_common(node, fp16, "avg_pool2d", None, 4)


def _adaptive_avg(node: torch.fx.Node, fp16: bool) -> str | None:
    if _rank(node.args[0]) != 4:
        return "adaptive_avg_pool2d on a non-4-d input is not supported"
    size = _val(node.args[0]).shape[-2:]
    out = node.args[1]
    if any(int(s) % int(o) for s, o in zip(size, out)):
        return "adaptive_avg_pool2d whose output size does not divide the input size becomes GatherND, which QNN HTP lacks"
    return None


def _addmm(node: torch.fx.Node, fp16: bool) -> str | None:
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return "addmm with alpha or beta != 1 is not supported by the QNN EP (Gemm with scaling)"
    return None


def _slice(node: torch.fx.Node, fp16: bool) -> str | None:
    if _arg(node, 4, "step", 1) != 1 and not fp16:
        return "slice with step != 1 fails to finalize with QNN HTP's fp32 kernels: --option qnn.precision=fp16"
    return None


def _layer_norm(node: torch.fx.Node, fp16: bool) -> str | None:
    if len(node.args[1]) != 1:
        return "layer_norm over more than the last dimension is not supported by the QNN EP"
    scale = _quantized_as(node.args[2]) if len(node.args) > 2 else None
    if _quantized_as(node.args[0]) in _SIXTEEN and scale not in (None, torch.uint8):
        return (f"layer_norm with 16-bit activations and its scale (weight) quantized as {str(scale).removeprefix('torch.')}: HTP's "
                f"LayerNorm takes only a uint8 scale with 16-bit activations (QNN error 3110 otherwise); "
                f"quantize with handoff's qnn quantizer (--option qnn.activation_bits=16 annotates it uint8)")
    return None


def _matmul(node: torch.fx.Node, fp16: bool) -> str | None:
    dtypes = [_quantized_as(a) for a in node.args[:2]]
    if torch.uint16 in dtypes and torch.int16 in dtypes:
        return ("MatMul of uint16 by int16: HTP refuses the mix (QNN error 3110; uint16 by uint16, uint8 or int8 "
                "compile); quantize with handoff's qnn quantizer (--option qnn.activation_bits=16 makes both uint16)")
    return None


_SIXTEEN = (torch.uint16, torch.int16)
#: Ops that only move values: a dequantize before them still decides the encoding HTP sees.
_MOVES = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.permute.default,
                    torch.ops.aten.transpose.int, torch.ops.aten.expand.default, torch.ops.aten.clone.default,
                    torch.ops.aten._unsafe_view.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim})


def _quantized_as(arg: Any) -> Any:
    """The integer dtype ``arg`` was dequantized from (through ops that only move values), or
    ``None`` for a float tensor."""
    while isinstance(arg, torch.fx.Node) and arg.target in _MOVES:
        arg = arg.args[0]
    return qdq_dtype(arg) if is_qdq(arg, "dequantize") else None


def _batch_norm_params(node: torch.fx.Node, params: frozenset[str] | None) -> str | None:
    if params is None:
        return None
    for arg in node.args[1:5]:
        if isinstance(arg, torch.fx.Node) and arg.name not in params:
            return ("batch_norm whose statistics or affine parameters are not weights of the model is not "
                    "supported by the QNN EP")
    return None


def _resize(node: torch.fx.Node, fp16: bool) -> str | None:
    if _rank(node.args[0]) != 4:
        return "upsampling a non-4-d input is not supported"
    return None


def _to_copy(node: torch.fx.Node, fp16: bool) -> str | None:
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
        return "_to_copy to a non-contiguous memory format is not supported"
    return None


# -- the table -----------------------------------------------------------------------------------
A = torch.ops.aten
_NO_KERNEL = "QNN HTP has no kernel for {op}"

TABLE: dict[Any, Rule | str] = {
    # elementwise, unary
    A.relu.default: Rule("Relu"),
    A.sigmoid.default: Rule("Sigmoid"),
    A.tanh.default: Rule("Tanh"),
    A.exp.default: Rule("Exp"),
    A.expm1.default: Rule("Exp, Sub"),
    A.log.default: Rule("Log"),
    A.log1p.default: Rule("Add, Log"),
    A.sqrt.default: Rule("Sqrt"),
    A.rsqrt.default: Rule("Sqrt, Reciprocal"),
    A.reciprocal.default: Rule("Reciprocal"),
    A.abs.default: Rule("Abs"),
    A.neg.default: Rule("Neg"),
    A.sin.default: Rule("Sin"),
    A.cos.default: Rule("Cos"),
    A.floor.default: Rule("Floor", fp16_inexact=_ROUNDING),
    A.ceil.default: Rule("Ceil", fp16_inexact=_ROUNDING),
    A.trunc.default: Rule("Abs, Floor, Sign, Mul", fp16_inexact=_ROUNDING),
    A.sign.default: Rule("Sign"),
    A.hardtanh.default: Rule("Clip"),
    A.clamp.default: Rule("Clip"),
    A.clamp.Tensor: Rule("Max, Min"),
    A.leaky_relu.default: Rule("LeakyRelu"),
    A.hardswish.default: Rule("HardSwish"),
    A.isnan.default: Rule("IsNaN", FLOAT_BOOL),
    A.gelu.default: Rule("Gelu", fp32=_FP32_MISSING),
    A.elu.default: Rule("Elu", fp32=_FP32_MISSING),
    A.round.default: Rule("Round", fp32=_FP32_MISSING, fp16_inexact=_ROUNDING),
    A.atan.default: Rule("Atan", fp32=_FP32_MISSING),
    A.erf.default: _NO_KERNEL + " (the QNN EP takes no ONNX Erf)",
    A.asin.default: _NO_KERNEL + " (the QNN EP takes no ONNX Asin)",
    A.acos.default: _NO_KERNEL + " (the QNN EP takes no ONNX Acos)",
    # elementwise, binary
    A.add.Tensor: Rule("Add", FLOAT_INT32),
    A.sub.Tensor: Rule("Sub", FLOAT_INT32),
    A.mul.Tensor: Rule("Mul", FLOAT_INT32),
    A.div.Tensor: Rule("Div"),
    A.div.Tensor_mode: Rule("Div, Floor", fp32=_FP32_MISSING, fp16_inexact=_ROUNDING),
    A.pow.Tensor_Scalar: Rule("Pow"),
    A.pow.Tensor_Tensor: Rule("Pow"),
    A.maximum.default: Rule("Max"),
    A.minimum.default: Rule("Min"),
    A.fmod.Scalar: _NO_KERNEL + " (the QNN EP takes no ONNX Mod with fmod=1)",
    A.fmod.Tensor: _NO_KERNEL + " (the QNN EP takes no ONNX Mod with fmod=1)",
    A.remainder.Scalar: Rule("Div, Floor, Mul, Sub", fp32=_FP32_MISSING, fp16_inexact=_ROUNDING),
    A.remainder.Tensor: Rule("Div, Floor, Mul, Sub", fp32=_FP32_MISSING, fp16_inexact=_ROUNDING),
    A.where.self: Rule("Where", ANY, fp32="QNN HTP has no fp32 kernel for aten.where.self on float data (it has "
                                          "fp16 and int32 ones): compile with --option qnn.precision=fp16"),
    # comparisons and logic (bool results)
    A.eq.Tensor: Rule("Equal", COMPARE),
    A.eq.Scalar: Rule("Equal", COMPARE),
    A.ne.Tensor: Rule("Equal, Not", COMPARE),
    A.ne.Scalar: Rule("Equal, Not", COMPARE),
    A.lt.Tensor: Rule("Less", COMPARE),
    A.lt.Scalar: Rule("Less", COMPARE),
    A.le.Tensor: Rule("LessOrEqual", COMPARE),
    A.le.Scalar: Rule("LessOrEqual", COMPARE),
    A.gt.Tensor: Rule("Greater", COMPARE),
    A.gt.Scalar: Rule("Greater", COMPARE),
    A.ge.Tensor: Rule("GreaterOrEqual", COMPARE),
    A.ge.Scalar: Rule("GreaterOrEqual", COMPARE),
    A.logical_and.default: Rule("And", LOGICAL),
    A.logical_or.default: Rule("Or", LOGICAL),
    A.logical_xor.default: Rule("Xor", LOGICAL),
    A.logical_not.default: Rule("Not", LOGICAL),
    A.bitwise_and.Tensor: Rule("And", LOGICAL),
    A.bitwise_or.Tensor: Rule("Or", LOGICAL),
    A.bitwise_not.default: Rule("Not", LOGICAL),
    # reductions and normalisation
    A.mean.dim: Rule("ReduceMean"),
    A.mean.default: Rule("ReduceMean"),
    A.sum.dim_IntList: Rule("ReduceSum"),
    A.amax.default: Rule("ReduceMax"),
    A.amin.default: Rule("ReduceMin"),
    A.max.dim: Rule("ReduceMax, ArgMax", outputs=2, index_outputs=(1,)),
    A.min.dim: Rule("ReduceMin, ArgMin", outputs=2, index_outputs=(1,)),
    A.var.correction: Rule("ReduceMean, Sub, Mul, ReduceMean, Div"),
    A.prod.dim_int: _NO_KERNEL + " (the QNN EP takes no ONNX ReduceProd)",
    A.cumsum.default: Rule("CumSum", fp32=_FP32_MISSING),
    A.argmax.default: Rule("ArgMax", index_outputs=(0,)),
    A.argmin.default: Rule("ArgMin", index_outputs=(0,)),
    A._softmax.default: Rule("Softmax"),
    A._log_softmax.default: Rule("LogSoftmax"),
    A._native_batch_norm_legit_no_training.default: Rule("BatchNormalization", outputs=1),
    A.native_layer_norm.default: Rule(
        "LayerNormalization", outputs=1, check=_layer_norm,
        fp32="QNN HTP computes LayerNorm in reduced precision (4e-4 relative error on fp32 data); claimed "
             "with --option qnn.precision=fp16 only"),
    A.native_group_norm.default: Rule("InstanceNormalization", outputs=1, fp32=_FP32_MISSING),
    # linear algebra and convolution
    A.mm.default: Rule("MatMul", check=_matmul),
    A.bmm.default: Rule("MatMul", check=_matmul),
    A.addmm.default: Rule("Gemm", check=_addmm),
    A.linear.default: Rule("Gemm / MatMul, Add"),
    A.convolution.default: Rule("Conv / ConvTranspose", check=_conv),
    # pooling and resizing
    A.max_pool2d_with_indices.default: Rule("MaxPool", outputs=1, check=_max_pool),
    A.max_pool2d.default: Rule("MaxPool", check=_max_pool),
    A.avg_pool2d.default: Rule("AveragePool", check=_avg_pool),
    A._adaptive_avg_pool2d.default: Rule("AveragePool", check=_adaptive_avg),
    A.upsample_nearest2d.vec: Rule("Resize", check=_resize),
    A.upsample_bilinear2d.vec: Rule("Resize", check=_resize),
    # data movement
    A.view.default: Rule("Reshape", ANY),
    A.permute.default: Rule("Transpose", ANY),
    A.expand.default: Rule("Expand", ANY),
    A.slice.Tensor: Rule("Slice", ANY, check=_slice),
    A.select.int: Rule("Gather", ANY),
    A.squeeze.dims: Rule("Squeeze", ANY),
    A.unsqueeze.default: Rule("Unsqueeze", ANY),
    A.cat.default: Rule("Concat", ANY),
    A.split_with_sizes.default: Rule("Split", ANY, outputs=1 << 16),
    A.clone.default: Rule("Identity", ANY),
    A.constant_pad_nd.default: Rule("Pad"),
    A.repeat.default: Rule("Tile", ANY),
    A.flip.default: Rule("Slice", ANY),
    A._to_copy.default: Rule("Cast", ANY, check=_to_copy),
    A.index_select.default: Rule("Gather", ANY, fp32=_FP32_MISSING, index_args=(2,)),
    A.embedding.default: Rule("Gather", fp32=_FP32_MISSING, index_args=(1,)),
    A.gather.default: Rule("GatherElements", ANY, fp32=_FP32_MISSING, index_args=(2,)),
    A.index.Tensor: Rule("Gather / GatherND", ANY, index_args=(1,)),
}

#: Ops other backends keep whole (``ops_to_not_decompose``) that reach this table undecomposed.
KEPT_ELSEWHERE = (A.linear.default, A.hardswish.default, A.max_pool2d.default, A.upsample_bilinear2d.vec)


def op_name(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", repr(target))


def _used_outputs(node: torch.fx.Node) -> tuple[list[Any], list[int]]:
    """Values of the outputs of ``node`` that something reads, and their indices."""
    val = node.meta.get("val")
    if not isinstance(val, (list, tuple)):
        return [val], [0]
    used = sorted({u.args[1] for u in node.users if u.target is operator.getitem})
    return [val[i] for i in used], used


def _leaves(values: list[Any]) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# -- int8: PT2E quantize/dequantize ops (QDQ in ONNX) ---------------------------------------------
#: Integer dtypes HTP's QDQ path takes for activations: 8-bit (8a8w) and 16-bit (16a8w) ones.
QDQ_ACTIVATION_DTYPES = (torch.uint8, torch.int8, torch.uint16, torch.int16)
#: The quantize/dequantize ops of ``torch.ops.quantized_decomposed`` that become ONNX
#: QuantizeLinear / DequantizeLinear (registered by torchao; matched by name, not imported here).
QDQ_OPS = frozenset({"quantize_per_tensor.default", "quantize_per_tensor.tensor", "dequantize_per_tensor.default",
                     "dequantize_per_tensor.tensor", "dequantize_per_channel.default"})
QDQ_NAMESPACE = "quantized_decomposed"


def qdq_dtype(node: torch.fx.Node) -> Any:
    """The integer dtype of a quantize/dequantize op (its last argument)."""
    return node.kwargs.get("dtype", node.args[-1] if node.args else None)


def _qdq_reason(node: torch.fx.Node, weights: frozenset[str] | None) -> str | None:
    """Why HTP's QDQ path cannot take a quantize/dequantize op, or ``None``.

    An op group dequantize -> op -> quantize runs in integer arithmetic on HTP (the QNN EP fuses
    each such ONNX node unit); the quantize/dequantize ops alone become HTP Quantize/Dequantize.
    """
    op = node.target
    name = f"{QDQ_NAMESPACE}.{op.__name__}"
    if op.__name__ not in QDQ_OPS:
        return (f"{name} has no HTP equivalent in handoff-qnn (it takes {', '.join(sorted(QDQ_OPS))}: "
                f"per-tensor activations, per-channel weights)")
    dtype = qdq_dtype(node)
    qmin, qmax = node.args[-3], node.args[-2]
    source = node.args[0]
    is_weight = isinstance(source, torch.fx.Node) and source.op == "placeholder" and (
        weights is None or source.name in weights)
    if op.__name__.startswith("dequantize_per_channel") and not is_weight:
        return f"{name} of an activation: HTP quantizes activations per tensor (per-channel only for weights)"
    if dtype == torch.int32 and op.__name__.startswith("dequantize") and is_weight:
        return None  # an int32 bias, dequantized into its conv/linear's node unit
    if dtype not in QDQ_ACTIVATION_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in QDQ_ACTIVATION_DTYPES)
        return f"{name} to {dtype}: HTP's QDQ path takes {valid} (and int32 biases of weights)"
    if op.__name__.startswith("quantize"):
        info = torch.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):
            return (f"{name} clamps to [{qmin}, {qmax}], narrower than {str(dtype).removeprefix('torch.')}'s range: "
                    f"ONNX QuantizeLinear (HTP's Quantize) saturates to the full range")
        if not (_val(source) is not None and _val(source).dtype == torch.float32):
            return f"{name} of a non-float32 tensor is not supported on HTP"
    if _rank(source) > MAX_RANK:
        return f"rank-{_rank(source)} tensors are not supported on QNN HTP (at most {MAX_RANK} dimensions)"
    if op.__name__.startswith("dequantize"):
        for user in node.users:
            floats = [a.name for a in user.all_input_nodes if a.op == "placeholder" and _val(a) is not None
                      and _val(a).dtype == torch.float32]
            if user.target in _WEIGHTED and floats:
                return (f"{name} feeds {user.name} ({op_name(user.target)}), which also reads the float weight "
                        f"{floats[0]}: HTP computes such int8/float mixes wrongly (measured: a conv with int8 "
                        f"weights and a float bias); quantize the bias too (PT2E quantizers make it int32)")
    return None


#: Ops with weights and a bias, where int8 and float operands must not mix on HTP.
_WEIGHTED = frozenset({A.convolution.default, A.linear.default, A.addmm.default})


def is_qdq(node: Any, kind: str) -> bool:
    """Whether ``node`` is a ``quantized_decomposed`` op whose name starts with ``kind``."""
    return (isinstance(node, torch.fx.Node) and getattr(node.target, "namespace", None) == QDQ_NAMESPACE
            and node.target.__name__.startswith(kind))


def in_qdq_unit(node: torch.fx.Node) -> bool:
    """Whether ``node`` is the op of a dequantize -> op -> quantize group: every tensor it reads
    comes from a dequantize op and every result it produces goes only to quantize ops. HTP runs
    such a group with its integer kernels (the QNN EP fuses the ONNX node unit), not its fp32 ones."""
    inputs = node.all_input_nodes
    if not inputs or not all(is_qdq(a, "dequantize") for a in inputs):
        return False
    users = [u for g in node.users for u in (g.users if g.target is operator.getitem else [g])]
    return bool(users) and all(is_qdq(u, "quantize") for u in users)


def decline_reason(node: torch.fx.Node, target: Target, weights: frozenset[str] | None = None) -> str | None:
    """``None`` when QNN HTP takes ``node`` for ``target``, else why not (one line).

    :param weights: names of the placeholders that are parameters, buffers or constants of the
        program (batch norm needs its statistics as weights); ``None`` skips that check.
    """
    op = node.target
    if op is operator.getitem:
        return None  # kept with its producer by the core
    if getattr(op, "namespace", None) == QDQ_NAMESPACE:
        return _qdq_reason(node, weights)
    name = op_name(op)
    rule = TABLE.get(op)
    if rule is None:
        return f"QNN HTP has no kernel for {name} in handoff-qnn's verified op table"
    if isinstance(rule, str):
        return rule.format(op=name)
    inputs = _leaves([_val(n) for n in node.all_input_nodes])
    outputs, used = _used_outputs(node)
    if any(i >= rule.outputs for i in used):
        extra = [i for i in used if i >= rule.outputs]
        return f"output {extra[0]} of {name} is used; QNN produces only its first {rule.outputs} output(s)"
    if not inputs:
        return f"{name} reads no tensor (a constant): nothing for HTP to compute"
    index_ids = {id(t) for i in rule.index_args if i < len(node.args)
                 for t in _leaves([_val(a) for a in torch.utils._pytree.tree_leaves(node.args[i])])}
    index_ids |= {id(t) for i, v in zip(used, outputs) if i in rule.index_outputs for t in _leaves([v])}
    tensors = inputs + _leaves(outputs)
    for t in tensors:
        dtype = _dtype(t)
        if dtype == "int64" and id(t) in index_ids:
            continue
        if dtype == "int64":
            return "int64 tensors are not supported on HTP (the QNN EP narrows them to int32, silently wrapping " \
                   "values beyond 2**31); cast to int32 in the model"
        if dtype == "float64":
            return "float64 tensors are not supported on HTP; cast to float32 in the model"
        if dtype not in rule.dtypes:
            return f"dtype {dtype} is not supported by QNN HTP for {name} (supported: {', '.join(sorted(rule.dtypes))})"
    for t in tensors:
        if t.dim() > MAX_RANK:
            return f"rank-{t.dim()} tensors are not supported on QNN HTP (at most {MAX_RANK} dimensions)"
        if t.numel() == 0 and t.dim() > 0:
            return "empty tensors are not supported on QNN HTP"
    fp16 = target.precision == "fp16"
    if rule.fp32 and not fp16 and not in_qdq_unit(node) and any(t.dtype == torch.float32 for t in tensors):
        return rule.fp32.format(op=name)
    if rule.fp16_inexact and fp16 and any(t.dtype == torch.float32 for t in tensors):
        return rule.fp16_inexact.format(op=name)
    if op is A._native_batch_norm_legit_no_training.default:
        reason = _batch_norm_params(node, weights)
        if reason:
            return reason
    if rule.check is not None:
        return rule.check(node, fp16)
    return None


def weight_names(ep: Any) -> frozenset[str]:
    """Placeholders of ``ep`` that are parameters, buffers or lifted constants."""
    sig = ep.graph_signature
    return frozenset([*sig.inputs_to_parameters, *sig.inputs_to_buffers, *sig.inputs_to_lifted_tensor_constants])


def support(ep: Any, target: Target) -> dict[str, str | None]:
    """:func:`decline_reason` per node, and a dequantize whose quantize HTP declines is declined
    too: alone in a QNN graph, a DequantizeLinear of an 8/16-bit graph input falls to ONNX
    Runtime's CPU EP, so the partition holding it would fail its in-context compile and be
    bisected node by node (minutes for a transformer with 16-bit activations)."""
    weights = weight_names(ep)
    verdict = {n.name: decline_reason(n, target, weights) for n in ep.graph.nodes if n.op == "call_function"}
    for node in ep.graph.nodes:
        if verdict.get(node.name) is None and is_qdq(node, "dequantize") and is_qdq(node.args[0], "quantize") \
                and (why := verdict.get(node.args[0].name)):
            verdict[node.name] = (f"{op_name(node.target)} reads {node.args[0].name}, which QNN HTP does not take "
                                  f"({why}); a dequantize without its quantize would fall to ONNX Runtime's CPU EP")
    return verdict


def table_rows() -> list[tuple[str, str]]:
    """``(op, what the table says)`` for the README and the check tool."""
    rows = []
    for op, rule in TABLE.items():
        if isinstance(rule, str):
            rows.append((op_name(op), "declined: " + rule.format(op=op_name(op))))
        else:
            notes = [f"ONNX {rule.onnx}", "dtypes " + ", ".join(sorted(rule.dtypes))]
            if rule.fp32:
                notes.append("fp16 arithmetic only")
            if rule.check is not None:
                notes.append("constraints: " + rule.check.__name__.strip("_"))
            rows.append((op_name(op), "; ".join(notes)))
    return rows


def mapping_summary() -> Mapping[str, int]:
    return {"claimed": sum(isinstance(r, Rule) for r in TABLE.values()),
            "declined": sum(isinstance(r, str) for r in TABLE.values())}
