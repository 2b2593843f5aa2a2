#!/usr/bin/env python
"""Check handoff-qnn's op table (handoff_qnn/ops.py) against real QNN compiles.

For every sample below (at least one per table entry, plus the constraint cases the table
declines), a one-op module is exported and decomposed as ``handoff partition`` does, the table is
asked whether it claims the op's node, and the node is compiled for real (``torch.onnx.export`` ->
ONNX Runtime's QNN EP on the HTP backend, CPU fallback disabled -> QNN context binary), loaded by
the runtime half and run on the HTP emulator against eager torch (1e-4 relative for fp32
arithmetic, 1e-2 for fp16, exact for integers and bools).

A claim must compile *and* match; a decline must fail one of the two. Anything else is a mismatch,
and the exit status is 1.

    python plugins/qnn/tools/check_op_table.py                                  # fp32 arithmetic
    python plugins/qnn/tools/check_op_table.py --option precision=fp16 --option soc_model=SM8650
    python plugins/qnn/tools/check_op_table.py -k pool --verbose                # a subset
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plugin's source tree

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from handoff.testing import Samples, check_op_table, int8_samples  # noqa: E402
from handoff_qnn import ops  # noqa: E402

A = torch.ops.aten


SAMPLES = Samples(seed=0)
r, ri, rb, S, _gen = SAMPLES.r, SAMPLES.ri, SAMPLES.rb, SAMPLES.add, SAMPLES.gen


def _bn(c: int, d: int = 2) -> torch.nn.Module:
    m = (torch.nn.BatchNorm2d if d == 2 else torch.nn.BatchNorm1d)(c).eval()
    with torch.no_grad():
        m.running_mean.normal_(generator=_gen)
        m.running_var.uniform_(0.5, 2.0, generator=_gen)
        m.weight.uniform_(0.5, 1.5, generator=_gen)
        m.bias.normal_(generator=_gen)
    return m


def _conv(cls: type, *args: Any, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(*args, **kwargs).eval()


X = r(2, 8, 6, 6)
# -- elementwise, unary
for op, fn, lo in [(A.relu.default, torch.relu, None), (A.sigmoid.default, torch.sigmoid, None),
                   (A.tanh.default, torch.tanh, None), (A.exp.default, torch.exp, None),
                   (A.expm1.default, torch.expm1, None), (A.log.default, torch.log, 0.1),
                   (A.log1p.default, torch.log1p, 0.0), (A.sqrt.default, torch.sqrt, 0.1),
                   (A.rsqrt.default, torch.rsqrt, 0.1), (A.reciprocal.default, torch.reciprocal, 0.5),
                   (A.abs.default, torch.abs, None), (A.neg.default, torch.neg, None),
                   (A.sin.default, torch.sin, None), (A.cos.default, torch.cos, None),
                   (A.sign.default, torch.sign, None), (A.erf.default, torch.erf, None),
                   (A.atan.default, torch.atan, None), (A.elu.default, F.elu, None),
                   (A.gelu.default, F.gelu, None)]:
    S(op, op_name := str(op).split(".")[1], fn, r(2, 8, 6, 6, lo=lo))
    if op in (A.gelu.default, A.atan.default, A.elu.default, A.exp.default):
        S(op, f"{op_name} float16", fn, r(2, 8, 6, 6, lo=lo, dtype=torch.float16))
S(A.asin.default, "asin", torch.asin, r(2, 8, 6, 6).clamp(-0.9, 0.9))
S(A.acos.default, "acos", torch.acos, r(2, 8, 6, 6).clamp(-0.9, 0.9))
S(A.gelu.default, "gelu tanh", lambda a: F.gelu(a, approximate="tanh"), r(1, 32, 64))
# Rounding ops get values within 1e-3 of an integer: fp16 cannot tell them from the integer.
NEAR = (torch.arange(1, 41, dtype=torch.float32) + torch.tensor([-1e-3, 1e-3]).repeat(20)).reshape(5, 8)
S(A.floor.default, "floor near integers", torch.floor, NEAR)
S(A.ceil.default, "ceil near integers", torch.ceil, NEAR)
S(A.trunc.default, "trunc near integers", torch.trunc, NEAR)
S(A.round.default, "round near .5", torch.round, NEAR + 0.5)
S(A.hardtanh.default, "relu6", F.relu6, X * 4)
S(A.hardtanh.default, "hardtanh", lambda a: F.hardtanh(a, -0.5, 2.0), X)
S(A.clamp.default, "clamp", lambda a: a.clamp(-0.5, 0.7), X)
S(A.clamp.default, "clamp min", lambda a: a.clamp(min=-0.5), X)
S(A.clamp.Tensor, "clamp tensors", lambda a, b, c: torch.clamp(a, b, c), X, -r(8, 1, 1, lo=0.0), r(8, 1, 1, lo=0.0))
S(A.leaky_relu.default, "leaky_relu", lambda a: F.leaky_relu(a, 0.1), X)
S(A.hardswish.default, "hardswish (kept whole)", lambda a: A.hardswish.default(a), X * 3)
S(A.isnan.default, "isnan", torch.isnan, torch.tensor([[math.nan, 1.0, -2.0, 0.0]]))
# -- elementwise, binary
for op, fn in [(A.add.Tensor, torch.add), (A.sub.Tensor, torch.sub), (A.mul.Tensor, torch.mul),
               (A.maximum.default, torch.maximum), (A.minimum.default, torch.minimum)]:
    name = str(op).split(".")[1]
    S(op, f"{name} broadcast", fn, X, r(8, 1, 1))
    S(op, f"{name} float16", fn, X.half(), r(8, 1, 1, dtype=torch.float16))
    if op in (A.add.Tensor, A.sub.Tensor, A.mul.Tensor):
        S(op, f"{name} int32", fn, ri(2, 3), ri(2, 3))
        S(op, f"{name} int64 beyond 2**31", lambda a, b, fn=fn: fn(a, b),
          torch.tensor([1, 2**33, -5]), torch.tensor([3, 3, 3]))
S(A.add.Tensor, "add scalar", lambda a: a + 1.5, X)
S(A.add.Tensor, "add alpha", lambda a, b: torch.add(a, b, alpha=2), X, r(8, 1, 1))
S(A.add.Tensor, "add float64", torch.add, X.double(), X.double())
S(A.add.Tensor, "add rank 6", torch.add, r(1, 2, 2, 2, 2, 3), r(1, 2, 2, 2, 2, 3))
S(A.add.Tensor, "add rank 5", torch.add, r(1, 2, 2, 2, 3), r(1, 2, 2, 2, 3))
S(A.sub.Tensor, "rsub scalar", lambda a: 1 - a, X)
S(A.div.Tensor, "div", torch.div, X, r(8, 1, 1, lo=0.5))
S(A.div.Tensor, "div scalar", lambda a: a / 8.0, X)
S(A.div.Tensor_mode, "div floor near integers", lambda a, b: torch.div(a, b, rounding_mode="floor"), NEAR, torch.ones(8))
S(A.div.Tensor_mode, "div trunc near integers", lambda a, b: torch.div(a, b, rounding_mode="trunc"), NEAR, torch.ones(8))
S(A.pow.Tensor_Scalar, "pow 2", lambda a: a ** 2, X)
S(A.pow.Tensor_Scalar, "pow 3.0", lambda a: torch.pow(a, 3.0), X)
S(A.pow.Tensor_Tensor, "pow tensors", torch.pow, r(2, 8, 6, 6, lo=0.1), r(2, 8, 6, 6))
S(A.fmod.Scalar, "fmod", lambda a: torch.fmod(a, 0.7), X)
S(A.fmod.Tensor, "fmod tensor", torch.fmod, X, r(8, 1, 1, lo=0.5))
S(A.remainder.Scalar, "remainder near multiples", lambda a: torch.remainder(a, 0.7), NEAR * 0.7)
S(A.remainder.Tensor, "remainder tensor near multiples", torch.remainder, NEAR, torch.ones(8))
S(A.where.self, "where float", torch.where, rb(2, 8, 6, 6), X, r(8, 1, 1))
S(A.where.self, "where float16", torch.where, rb(4, 16), r(4, 16, dtype=torch.float16), r(4, 16, dtype=torch.float16))
S(A.where.self, "where int32", torch.where, rb(2, 3), ri(2, 3), ri(2, 3))
# -- comparisons, logic
for op, fn in [(A.eq.Tensor, torch.eq), (A.ne.Tensor, torch.ne), (A.lt.Tensor, torch.lt), (A.le.Tensor, torch.le),
               (A.gt.Tensor, torch.gt), (A.ge.Tensor, torch.ge)]:
    name = str(op).split(".")[1]
    S(op, f"{name}", fn, (X * 2).round(), (r(8, 1, 1) * 2).round())
for op, fn in [(A.eq.Scalar, lambda a: a == 1.0), (A.ne.Scalar, lambda a: a != 1.0), (A.lt.Scalar, lambda a: a < 0.1),
               (A.le.Scalar, lambda a: a <= 0.1), (A.gt.Scalar, lambda a: a > 0.1), (A.ge.Scalar, lambda a: a >= 0.1)]:
    S(op, f"{str(op).split('.')[1]} scalar", fn, (X * 2).round())
S(A.lt.Tensor, "lt int32", torch.lt, ri(2, 3), ri(2, 3))
for op, fn in [(A.logical_and.default, torch.logical_and), (A.logical_or.default, torch.logical_or),
               (A.logical_xor.default, torch.logical_xor), (A.bitwise_and.Tensor, torch.bitwise_and),
               (A.bitwise_or.Tensor, torch.bitwise_or)]:
    S(op, str(op).split(".")[1], fn, rb(2, 8, 6), rb(2, 8, 6))
S(A.logical_not.default, "logical_not", torch.logical_not, rb(2, 8, 6))
S(A.bitwise_not.default, "bitwise_not bool", torch.bitwise_not, rb(2, 8, 6))
# -- reductions, normalisation
S(A.mean.dim, "mean (2, 3)", lambda a: a.mean((2, 3)), X)
S(A.mean.dim, "mean keepdim", lambda a: a.mean(-1, keepdim=True), X)
S(A.mean.default, "mean all", lambda a: a.mean(), X)
S(A.sum.dim_IntList, "sum", lambda a: a.sum(1), X)
S(A.sum.dim_IntList, "sum all", lambda a: a.sum(), X)
S(A.amax.default, "amax", lambda a: a.amax(1), X)
S(A.amin.default, "amin", lambda a: a.amin(-1), X)
S(A.max.dim, "max dim values", lambda a: a.max(1)[0], X)
S(A.max.dim, "max dim indices", lambda a: a.max(1)[1], X)
S(A.min.dim, "min dim values", lambda a: a.min(1)[0], X)
S(A.var.correction, "var", lambda a: a.var(1), X)
S(A.prod.dim_int, "prod", lambda a: a.prod(1), X)
S(A.cumsum.default, "cumsum", lambda a: a.cumsum(1), X)
S(A.argmax.default, "argmax", lambda a: a.argmax(1), X)
S(A.argmin.default, "argmin", lambda a: a.argmin(1), X)
S(A._softmax.default, "softmax last", lambda a: a.softmax(-1), X)
S(A._softmax.default, "softmax dim 1", lambda a: a.softmax(1), X)
S(A._log_softmax.default, "log_softmax", lambda a: a.log_softmax(-1), X)
S(A._native_batch_norm_legit_no_training.default, "batch_norm 2d", lambda a: 0, X, module=_bn(8))
S(A._native_batch_norm_legit_no_training.default, "batch_norm 1d", lambda a: 0, r(2, 8, 10), module=_bn(8, 1))
S(A._native_batch_norm_legit_no_training.default, "batch_norm, statistics as inputs",
  lambda a, m, v: F.batch_norm(a, m, v), X, r(8), r(8, lo=0.5))
_ln = torch.nn.LayerNorm(64).eval()
with torch.no_grad():
    _ln.weight.uniform_(0.5, 1.5, generator=_gen)
    _ln.bias.normal_(generator=_gen)
S(A.native_layer_norm.default, "layer_norm", lambda a: 0, r(1, 32, 64), module=_ln)
S(A.native_layer_norm.default, "layer_norm float16", lambda a: 0, r(1, 32, 64, dtype=torch.float16),
  module=torch.nn.LayerNorm(64).half().eval())
S(A.native_layer_norm.default, "layer_norm over 2 dims", lambda a: F.layer_norm(a, (6, 6)), X)
S(A.native_group_norm.default, "group_norm", lambda a: 0, X, module=torch.nn.GroupNorm(4, 8).eval())
# -- linear algebra, convolution
S(A.mm.default, "mm", torch.mm, r(4, 16), r(16, 8))
S(A.bmm.default, "bmm", torch.bmm, r(3, 4, 16), r(3, 16, 8))
S(A.addmm.default, "addmm", torch.addmm, r(8), r(4, 16), r(16, 8))
S(A.addmm.default, "addmm alpha, beta", lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2),
  r(8), r(4, 16), r(16, 8))
S(A.linear.default, "linear (kept whole)", lambda a, w, b: A.linear.default(a, w, b), r(2, 4, 16), r(8, 16), r(8))
S(A.convolution.default, "conv2d", lambda a: 0, X, module=_conv(torch.nn.Conv2d, 8, 16, 3, padding=1))
S(A.convolution.default, "conv2d stride, dilation", lambda a: 0, X,
  module=_conv(torch.nn.Conv2d, 8, 16, 3, stride=2, dilation=2, padding=2))
S(A.convolution.default, "conv2d depthwise", lambda a: 0, X, module=_conv(torch.nn.Conv2d, 8, 8, 3, groups=8, padding=1))
S(A.convolution.default, "conv2d grouped", lambda a: 0, X, module=_conv(torch.nn.Conv2d, 8, 16, 3, groups=4))
S(A.convolution.default, "conv2d weight as input", lambda a, w: F.conv2d(a, w), X, r(4, 8, 3, 3))
S(A.convolution.default, "conv1d", lambda a: 0, r(2, 8, 10), module=_conv(torch.nn.Conv1d, 8, 16, 3, padding=1))
S(A.convolution.default, "conv_transpose2d", lambda a: 0, X,
  module=_conv(torch.nn.ConvTranspose2d, 8, 4, 3, stride=2, padding=1, output_padding=1))
S(A.convolution.default, "conv_transpose1d", lambda a: 0, r(2, 8, 10), module=_conv(torch.nn.ConvTranspose1d, 8, 4, 2, stride=2))
S(A.convolution.default, "conv3d", lambda a: 0, r(1, 4, 6, 6, 6), module=_conv(torch.nn.Conv3d, 4, 8, 3, padding=1))
# -- pooling, resizing
for op, pool in [(A.max_pool2d_with_indices.default, lambda a, *p, **k: F.max_pool2d(a, *p, return_indices=True, **k)[0]),
                 (A.max_pool2d.default, F.max_pool2d)]:  # the second is kept whole for XNNPACK
    S(op, "max_pool2d 2x2", lambda a, pool=pool: pool(a, 2), X)
    S(op, "max_pool2d 3, stride 2", lambda a, pool=pool: pool(a, 3, 2), r(2, 8, 7, 7))
    S(op, "max_pool2d padding", lambda a, pool=pool: pool(a, 3, 2, 1), X - 3)
    S(op, "max_pool2d ceil_mode", lambda a, pool=pool: pool(a, 2, ceil_mode=True), r(2, 8, 7, 7))
    S(op, "max_pool2d dilation", lambda a, pool=pool: pool(a, 2, dilation=2), X)
S(A.max_pool2d_with_indices.default, "max_pool2d indices", lambda a: F.max_pool2d(a, 2, return_indices=True)[1], X)
S(A.avg_pool2d.default, "avg_pool2d", lambda a: F.avg_pool2d(a, 2), X)
S(A.avg_pool2d.default, "avg_pool2d padding", lambda a: F.avg_pool2d(a, 3, 1, 1), X)
S(A.avg_pool2d.default, "avg_pool2d padding, count_include_pad=False", lambda a: F.avg_pool2d(a, 3, 1, 1, count_include_pad=False), X)
S(A.avg_pool2d.default, "avg_pool2d ceil_mode", lambda a: F.avg_pool2d(a, 2, ceil_mode=True), r(2, 8, 7, 7))
S(A._adaptive_avg_pool2d.default, "adaptive_avg_pool2d 3 of 6", lambda a: F.adaptive_avg_pool2d(a, 3), X)
S(A._adaptive_avg_pool2d.default, "adaptive_avg_pool2d 4 of 6", lambda a: F.adaptive_avg_pool2d(a, 4), X)
S(A.upsample_nearest2d.vec, "upsample nearest", lambda a: F.interpolate(a, scale_factor=2), X)
S(A.upsample_bilinear2d.vec, "upsample bilinear (kept whole)", lambda a: F.interpolate(a, scale_factor=2, mode="bilinear"), X)
S(A.upsample_bilinear2d.vec, "upsample bilinear align_corners", lambda a: F.interpolate(a, scale_factor=2, mode="bilinear", align_corners=True), X)
# -- data movement (a neighbour op makes the graph non-trivial where the op alone is a no-op)
S(A.view.default, "view", lambda a: a.reshape(2, -1), X)
S(A.view.default, "view int32", lambda a: a.reshape(-1), ri(2, 3))
S(A.view.default, "view to rank 6", lambda a: a.reshape(1, 2, 2, 2, 2, 9), r(2, 72))
S(A.permute.default, "permute", lambda a: a.permute(0, 2, 3, 1), X)
S(A.permute.default, "permute int32", lambda a: a.permute(1, 0), ri(2, 3))
S(A.expand.default, "expand", lambda a: a.expand(2, 8, 6, 6), r(1, 8, 1, 6))
S(A.slice.Tensor, "slice", lambda a: a[:, 1:5], X)
S(A.slice.Tensor, "slice step 2", lambda a: a[:, 1:7:2], X)
S(A.select.int, "select", lambda a: a[:, 1], X)
S(A.squeeze.dims, "squeeze", lambda a: a.squeeze(0), r(1, 8, 6))
S(A.unsqueeze.default, "unsqueeze", lambda a: a.unsqueeze(1), X)
S(A.cat.default, "cat", lambda a, b: torch.cat([a, b], 1), X, r(2, 3, 6, 6))
S(A.cat.default, "cat int32", lambda a, b: torch.cat([a, b], 0), ri(2, 3), ri(2, 3))
S(A.split_with_sizes.default, "split", lambda a: torch.split(a, [3, 5], 1), X)
S(A.clone.default, "clone (after a relu)", lambda a: torch.relu(a).clone(), X, allow=(A.relu.default,))
S(A.constant_pad_nd.default, "constant_pad_nd", lambda a: F.pad(a, (1, 1, 2, 0), value=0.5), X)
S(A.repeat.default, "repeat", lambda a: a.repeat(1, 2, 1, 1), X)
S(A.flip.default, "flip", lambda a: a.flip(1), X)
S(A._to_copy.default, "to float16", lambda a: a.half(), X)
S(A._to_copy.default, "to float32", lambda a: a.float(), X.half())
S(A._to_copy.default, "to int32", lambda a: a.to(torch.int32), X * 5)
S(A._to_copy.default, "bool to float32", lambda a: a.float(), rb(2, 8))
S(A.index_select.default, "index_select", lambda a, i: a.index_select(1, i), X, torch.tensor([0, 3, 2]))
S(A.embedding.default, "embedding", lambda w, i: F.embedding(i, w), r(10, 4), torch.tensor([[1, 2, 9]]))
S(A.gather.default, "gather", lambda a, i: a.gather(1, i), r(3, 5), torch.tensor([[0, 1], [2, 3], [4, 0]]))
S(A.index.Tensor, "index dim 0", lambda a, i: a[i], r(5, 3), torch.tensor([0, 4, 2]))
S(A.index.Tensor, "index dim 1", lambda a, i: a[:, i], r(3, 5), torch.tensor([0, 4, 2]))
S(A.index.Tensor, "index 2 tensors", lambda a, i, j: a[i, j], r(5, 3), torch.tensor([0, 4, 2]), torch.tensor([0, 1, 2]))
S(A.argmax.default, "argmax float16", lambda a: a.argmax(-1), r(4, 16, dtype=torch.float16))

# int8 (dq -> op -> q, as PT2E leaves each op): HTP's integer kernels, within one quantization step
SAMPLES.extend(int8_samples(keep=ops.KEPT_ELSEWHERE))


# -- the check (handoff.testing.check_op_table: the runtime half runs the blob on the HTP emulator) --
def main(argv: list[str] | None = None) -> int:
    return check_op_table("qnn", SAMPLES, argv, description=__doc__.splitlines()[0], lower="lower_unchecked",
                          keep=ops.KEPT_ELSEWHERE, table=ops.TABLE, neighbours=False)


if __name__ == "__main__":
    sys.exit(main())
