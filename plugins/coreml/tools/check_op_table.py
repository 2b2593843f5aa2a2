#!/usr/bin/env python
"""Check handoff-coreml's capability (handoff_coreml/capability.py) against real conversions.

For every sample below (one or more per op, plus the constraint cases), a one-op module is
exported and decomposed as ``handoff partition`` does, the capability check is asked whether it
claims the op's node, and the node is converted for real, whatever the check said
(``CoreMLCompiler.lower_unchecked``: coremltools 9.0 -> ML Program -> the delegate blob, reloaded
with ``MLModel(skip_model_load=True)``, its features and MIL operations checked). Where every MIL
operation of the result has a numpy implementation in coremltools (``handoff_coreml.reference``),
the blob is evaluated and compared with eager torch (1e-4 relative for fp32 arithmetic, 1e-2 for
fp16, 1e-12 for float64, exact for integers and bools); Core ML itself cannot run here.

A claim must convert (and match, where evaluable); a decline must fail one of the two. A decline
for a device-only bug that no conversion shows (``KNOWN_BAD``, argmax over the flattened input) is
listed as "documented", not counted either way. Anything else is a mismatch: exit status 1.

    python plugins/coreml/tools/check_op_table.py                          # precision=fp16 (the default)
    python plugins/coreml/tools/check_op_table.py --option precision=fp32
    python plugins/coreml/tools/check_op_table.py -k pool --verbose        # a subset
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plugin's source tree

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from handoff.testing import NotEvaluable, Samples, check_op_table, int8_samples  # noqa: E402
from handoff_coreml import capability, reference  # noqa: E402

A = torch.ops.aten
#: Ops other backends keep whole (xnnpack: linear, hardswish, max_pool2d, upsample_bilinear2d):
#: the capability check sees them undecomposed when those backends are selected too.
KEPT_ELSEWHERE = (A.linear.default, A.hardswish.default, A.max_pool2d.default, A.upsample_bilinear2d.vec)


SAMPLES = Samples(seed=0)
r, ri, rb, S, _gen = SAMPLES.r, SAMPLES.ri, SAMPLES.rb, SAMPLES.add, SAMPLES.gen


def _norms(m: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in m.modules():
            if isinstance(p, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                p.running_mean.normal_(generator=_gen)
                p.running_var.uniform_(0.5, 2.0, generator=_gen)
            if getattr(p, "weight", None) is not None and not isinstance(p, (torch.nn.Conv1d, torch.nn.Conv2d,
                                                                            torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                                                                            torch.nn.ConvTranspose2d, torch.nn.Linear)):
                p.weight.uniform_(0.5, 1.5, generator=_gen)
                p.bias.normal_(generator=_gen)
    return m.eval()


def _mod(cls: type, *args: Any, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return _norms(cls(*args, **kwargs))


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
                   (A.gelu.default, F.gelu, None), (A.floor.default, torch.floor, None),
                   (A.ceil.default, torch.ceil, None), (A.round.default, torch.round, None),
                   (A.trunc.default, torch.trunc, None), (A.tan.default, torch.tan, None),
                   (A.asinh.default, torch.asinh, None), (A.acosh.default, torch.acosh, 1.0),
                   (A.sinh.default, torch.sinh, None), (A.cosh.default, torch.cosh, None),
                   (A.log2.default, torch.log2, 0.1), (A.exp2.default, torch.exp2, None),
                   (A.isnan.default, torch.isnan, None), (A.logical_not.default, torch.logical_not, None)]:
    S(op, str(op).split(".")[1], fn, r(2, 8, 6, 6, lo=lo))
S(A.asin.default, "asin", torch.asin, r(2, 8, 6, 6).clamp(-0.9, 0.9))
S(A.acos.default, "acos", torch.acos, r(2, 8, 6, 6).clamp(-0.9, 0.9))
S(A.atanh.default, "atanh", torch.atanh, r(2, 8, 6, 6).clamp(-0.9, 0.9))
S(A.gelu.default, "gelu tanh", lambda a: F.gelu(a, approximate="tanh"), r(1, 32, 64))
S(A.gelu.default, "gelu float16", F.gelu, r(1, 32, 64, dtype=torch.float16))
S(A.hardtanh.default, "relu6", F.relu6, X * 4)
S(A.hardtanh.default, "hardtanh", lambda a: F.hardtanh(a, -0.5, 2.0), X)
S(A.clamp.default, "clamp", lambda a: a.clamp(-0.5, 0.7), X)
S(A.clamp.default, "clamp min", lambda a: a.clamp(min=-0.5), X)
S(A.clamp.Tensor, "clamp tensors", lambda a, b, c: torch.clamp(a, b, c), X, -r(8, 1, 1, lo=0.0), r(8, 1, 1, lo=0.0))
S(A.leaky_relu.default, "leaky_relu", lambda a: F.leaky_relu(a, 0.1), X)
# (hardsigmoid, silu, softplus and mish reach backends decomposed: their parts are sampled here)
S(A.hardswish.default, "hardswish (kept whole)", lambda a: A.hardswish.default(a), X * 3)
S(A.isnan.default, "isnan with NaN", torch.isnan, torch.tensor([[math.nan, 1.0, -2.0, 0.0]]))
# -- elementwise, binary
for op, fn in [(A.add.Tensor, torch.add), (A.sub.Tensor, torch.sub), (A.mul.Tensor, torch.mul),
               (A.maximum.default, torch.maximum), (A.minimum.default, torch.minimum)]:
    name = str(op).split(".")[1]
    S(op, f"{name} broadcast", fn, X, r(8, 1, 1))
    S(op, f"{name} float16", fn, X.half(), r(8, 1, 1, dtype=torch.float16))
    S(op, f"{name} int32", fn, ri(2, 3), ri(2, 3))
S(A.add.Tensor, "add int64 beyond 2**31", torch.add, torch.tensor([1, 2**33, -5]), torch.tensor([3, 3, 3]))
S(A.mul.Tensor, "mul int64 beyond 2**31", torch.mul, torch.tensor([1, 2**33, -5]), torch.tensor([3, 3, 3]))
S(A.add.Tensor, "add scalar", lambda a: a + 1.5, X)
S(A.add.Tensor, "add alpha", lambda a, b: torch.add(a, b, alpha=2), X, r(8, 1, 1))
S(A.sub.Tensor, "sub alpha", lambda a, b: torch.sub(a, b, alpha=3), X, r(8, 1, 1))
S(A.add.Tensor, "add float64 near 1", torch.add, torch.ones(4, dtype=torch.float64), torch.full((4,), 1e-9, dtype=torch.float64))
S(A.add.Tensor, "add rank 6", torch.add, r(1, 2, 2, 2, 2, 3), r(1, 2, 2, 2, 2, 3))
S(A.add.Tensor, "add rank 5", torch.add, r(1, 2, 2, 2, 3), r(1, 2, 2, 2, 3))
S(A.add.Tensor, "add int8", torch.add, ri(2, 3, dtype=torch.int8), ri(2, 3, dtype=torch.int8))
S(A.add.Tensor, "add bool", torch.add, rb(2, 3), rb(2, 3))
S(A.sub.Tensor, "rsub scalar", lambda a: 1 - a, X)
S(A.div.Tensor, "div", torch.div, X, r(8, 1, 1, lo=0.5))
S(A.div.Tensor, "div scalar", lambda a: a / 8.0, X)
S(A.div.Tensor, "div int32 (true division)", torch.div, ri(2, 3), ri(2, 3, hi=1) * 0 + 3)
S(A.div.Tensor_mode, "div floor", lambda a, b: torch.div(a, b, rounding_mode="floor"), X * 4, r(8, 1, 1, lo=0.5))
S(A.div.Tensor_mode, "div trunc", lambda a, b: torch.div(a, b, rounding_mode="trunc"), X * 4, r(8, 1, 1, lo=0.5))
S(A.pow.Tensor_Scalar, "pow 2", lambda a: a ** 2, X)
S(A.pow.Tensor_Scalar, "pow 0.5", lambda a: torch.pow(a, 0.5), r(2, 8, 6, 6, lo=0.1))
S(A.pow.Tensor_Tensor, "pow tensors", torch.pow, r(2, 8, 6, 6, lo=0.1), r(2, 8, 6, 6))
S(A.fmod.Scalar, "fmod", lambda a: torch.fmod(a, 0.7), X)
S(A.remainder.Scalar, "remainder", lambda a: torch.remainder(a, 0.7), X)
S(A.remainder.Tensor, "remainder tensor", torch.remainder, X, r(8, 1, 1, lo=0.5))
S(A.where.self, "where float", torch.where, rb(2, 8, 6, 6), X, r(8, 1, 1))
S(A.where.self, "where int32", torch.where, rb(2, 3), ri(2, 3), ri(2, 3))
S(A.atan2.default, "atan2", torch.atan2, X, r(8, 1, 1))
# -- comparisons and logic
for op, fn in [(A.eq.Tensor, torch.eq), (A.ne.Tensor, torch.ne), (A.lt.Tensor, torch.lt), (A.le.Tensor, torch.le),
               (A.gt.Tensor, torch.gt), (A.ge.Tensor, torch.ge)]:
    S(op, str(op).split(".")[1], fn, (X * 2).round(), (r(8, 1, 1) * 2).round())
for op, fn in [(A.eq.Scalar, lambda a: a == 1.0), (A.ne.Scalar, lambda a: a != 1.0), (A.lt.Scalar, lambda a: a < 0.1),
               (A.le.Scalar, lambda a: a <= 0.1), (A.gt.Scalar, lambda a: a > 0.1), (A.ge.Scalar, lambda a: a >= 0.1)]:
    S(op, f"{str(op).split('.')[1]} scalar", fn, (X * 2).round())
for op, fn in [(A.logical_and.default, torch.logical_and), (A.logical_or.default, torch.logical_or),
               (A.logical_xor.default, torch.logical_xor), (A.bitwise_and.Tensor, torch.bitwise_and),
               (A.bitwise_or.Tensor, torch.bitwise_or)]:
    S(op, str(op).split(".")[1], fn, rb(2, 8, 6), rb(2, 8, 6))
S(A.logical_not.default, "logical_not bool", torch.logical_not, rb(2, 8, 6))
S(A.bitwise_not.default, "bitwise_not bool", torch.bitwise_not, rb(2, 8, 6))
# -- reductions and normalisation
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
S(A.argmax.default, "argmax of the flattened input", lambda a: a.argmax(), X)
S(A.any.dim, "any", lambda a: a.any(1), rb(2, 8, 6))
S(A._softmax.default, "softmax last", lambda a: a.softmax(-1), X)
S(A._softmax.default, "softmax dim 1", lambda a: a.softmax(1), X)
S(A._log_softmax.default, "log_softmax", lambda a: a.log_softmax(-1), X)
S(A.topk.default, "topk values", lambda a: a.topk(3, -1)[0], X)
S(A.topk.default, "topk indices", lambda a: a.topk(3, -1)[1], X)
S(A.sort.default, "sort values", lambda a: a.sort(-1)[0], X)
S(A._native_batch_norm_legit_no_training.default, "batch_norm 2d", lambda a: 0, X, module=_mod(torch.nn.BatchNorm2d, 8))
S(A._native_batch_norm_legit_no_training.default, "batch_norm 1d", lambda a: 0, r(2, 8, 10),
  module=_mod(torch.nn.BatchNorm1d, 8))
S(A._native_batch_norm_legit_no_training.default, "batch_norm, statistics as inputs",
  lambda a, m, v: F.batch_norm(a, m, v), X, r(8), r(8, lo=0.5))
S(A.native_layer_norm.default, "layer_norm", lambda a: 0, r(1, 32, 64), module=_mod(torch.nn.LayerNorm, 64))
S(A.native_layer_norm.default, "layer_norm over 2 dims", lambda a: F.layer_norm(a, (6, 6)), X)
S(A.native_group_norm.default, "group_norm", lambda a: 0, X, module=_mod(torch.nn.GroupNorm, 4, 8))
# -- linear algebra and convolution
S(A.mm.default, "mm", torch.mm, r(4, 16), r(16, 8))
S(A.bmm.default, "bmm", torch.bmm, r(3, 4, 16), r(3, 16, 8))
S(A.addmm.default, "addmm", torch.addmm, r(8), r(4, 16), r(16, 8))
S(A.addmm.default, "addmm alpha, beta", lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2),
  r(8), r(4, 16), r(16, 8))
S(A.linear.default, "linear (kept whole)", lambda a, w, b: A.linear.default(a, w, b), r(2, 4, 16), r(8, 16), r(8))
S(A.linear.default, "linear layer (kept whole)", lambda a: 0, r(2, 4, 16), module=_mod(torch.nn.Linear, 16, 8))
S(A.convolution.default, "conv2d", lambda a: 0, X, module=_mod(torch.nn.Conv2d, 8, 16, 3, padding=1))
S(A.convolution.default, "conv2d stride, dilation", lambda a: 0, X,
  module=_mod(torch.nn.Conv2d, 8, 16, 3, stride=2, dilation=2, padding=2))
S(A.convolution.default, "conv2d depthwise", lambda a: 0, X, module=_mod(torch.nn.Conv2d, 8, 8, 3, groups=8, padding=1))
S(A.convolution.default, "conv2d weight as input", lambda a, w: F.conv2d(a, w), X, r(4, 8, 3, 3))
S(A.convolution.default, "conv1d", lambda a: 0, r(2, 8, 10), module=_mod(torch.nn.Conv1d, 8, 16, 3, padding=1))
S(A.convolution.default, "conv_transpose2d", lambda a: 0, X,
  module=_mod(torch.nn.ConvTranspose2d, 8, 4, 3, stride=2, padding=1, output_padding=1))
S(A.convolution.default, "conv3d", lambda a: 0, r(1, 4, 6, 6, 6), module=_mod(torch.nn.Conv3d, 4, 8, 3, padding=1))
# -- pooling and resizing
for op, pool in [(A.max_pool2d_with_indices.default, lambda a, *p, **k: F.max_pool2d(a, *p, return_indices=True, **k)[0]),
                 (A.max_pool2d.default, lambda a, *p, **k: A.max_pool2d.default(a, *p, **k))]:
    S(op, "max_pool2d 2x2", lambda a, pool=pool: pool(a, [2, 2]), X)
    S(op, "max_pool2d 3, stride 2", lambda a, pool=pool: pool(a, [3, 3], [2, 2]), r(2, 8, 7, 7))
    S(op, "max_pool2d padding", lambda a, pool=pool: pool(a, [3, 3], [2, 2], [1, 1]), X - 3)
    S(op, "max_pool2d ceil_mode", lambda a, pool=pool: pool(a, [2, 2], [2, 2], [0, 0], [1, 1], True), r(2, 8, 7, 7))
    S(op, "max_pool2d dilation", lambda a, pool=pool: pool(a, [2, 2], [2, 2], [0, 0], [2, 2]), X)
S(A.max_pool2d_with_indices.default, "max_pool2d indices", lambda a: F.max_pool2d(a, 2, return_indices=True)[1], X)
S(A.avg_pool2d.default, "avg_pool2d", lambda a: F.avg_pool2d(a, 2), X)
S(A.avg_pool2d.default, "avg_pool2d padding", lambda a: F.avg_pool2d(a, 3, 1, 1), X)
S(A.avg_pool2d.default, "avg_pool2d padding, count_include_pad=False",
  lambda a: F.avg_pool2d(a, 3, 1, 1, count_include_pad=False), X)
S(A.avg_pool2d.default, "avg_pool2d ceil_mode", lambda a: F.avg_pool2d(a, 2, ceil_mode=True), r(2, 8, 7, 7))
S(A._adaptive_avg_pool2d.default, "adaptive_avg_pool2d 3 of 6", lambda a: F.adaptive_avg_pool2d(a, 3), X)
S(A._adaptive_avg_pool2d.default, "adaptive_avg_pool2d 4 of 6", lambda a: F.adaptive_avg_pool2d(a, 4), X)
S(A.upsample_nearest2d.vec, "upsample nearest", lambda a: F.interpolate(a, scale_factor=2), X)
S(A.upsample_bilinear2d.vec, "upsample bilinear (kept whole)",
  lambda a: F.interpolate(a, scale_factor=2, mode="bilinear"), X)
S(A.upsample_bilinear2d.vec, "upsample bilinear align_corners",
  lambda a: F.interpolate(a, scale_factor=2, mode="bilinear", align_corners=True), X)
S(A.pixel_shuffle.default, "pixel_shuffle", lambda a: F.pixel_shuffle(a, 2), X)
# -- data movement (a neighbour op keeps the graph non-trivial where the op alone is a no-op)
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
S(A.reflection_pad2d.default, "reflection_pad2d", lambda a: F.pad(a, (1, 1, 2, 0), mode="reflect"), X)
S(A.repeat.default, "repeat", lambda a: a.repeat(1, 2, 1, 1), X)
S(A.flip.default, "flip", lambda a: a.flip(1), X)
S(A._to_copy.default, "to float16", lambda a: a.half(), X)
S(A._to_copy.default, "to int32", lambda a: a.to(torch.int32), X * 5)
S(A._to_copy.default, "bool to float32", lambda a: a.float(), rb(2, 8))
S(A.index_select.default, "index_select", lambda a, i: a.index_select(1, i), X, torch.tensor([0, 3, 2]))
S(A.embedding.default, "embedding", lambda w, i: F.embedding(i, w), r(10, 4), torch.tensor([[1, 2, 9]]))
S(A.gather.default, "gather", lambda a, i: a.gather(1, i), r(3, 5), torch.tensor([[0, 1], [2, 3], [4, 0]]))
S(A.index.Tensor, "index dim 0", lambda a, i: a[i], r(5, 3), torch.tensor([0, 4, 2]))
S(A.index.Tensor, "index dim 1", lambda a, i: a[:, i], r(3, 5), torch.tensor([0, 4, 2]))
S(A.diagonal.default, "diagonal", lambda a: torch.diagonal(a, 0, 0, 1) + 1, r(4, 4), allow=(A.add.Tensor,))
S(A.tril.default, "tril", torch.tril, r(5, 5))
S(A.arange.start_step, "arange int64 (from a shape)", lambda a: a + torch.arange(a.shape[-1]), ri(2, 6),
  allow=(A.add.Tensor,))
S(A.full.default, "full", lambda a: a + torch.full((2, 6), 3.0), r(2, 6), allow=(A.add.Tensor,))
S(A.scaled_dot_product_attention.default, "scaled_dot_product_attention (kept whole)",
  lambda q, k, v: A.scaled_dot_product_attention.default(q, k, v), r(1, 2, 5, 8), r(1, 2, 5, 8), r(1, 2, 5, 8))


# int8 (dq -> op -> q, as PT2E leaves each op): declined, with the reason (see capability.py)
SAMPLES.extend(int8_samples(keep=KEPT_ELSEWHERE))

# -- the check (handoff.testing.check_op_table) ------------------------------------------------------
def _evaluate(lowered: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The blob evaluated with coremltools' numpy implementations of its MIL operations (Core ML
    itself runs on Apple platforms only)."""
    try:
        return reference.evaluate(lowered.blob, inputs)
    except reference.NotEvaluable as exc:
        raise NotEvaluable(f"no numpy implementation of MIL {', '.join(exc.ops)}") from exc


def _documented(node: Any, reason: str | None) -> bool:
    """A decline for a device-only bug that no conversion shows."""
    return node.target in capability.KNOWN_BAD or (node.target in (A.argmax.default, A.argmin.default)
                                                   and "crashes Core ML" in (reason or ""))


def main(argv: list[str] | None = None) -> int:
    return check_op_table("coreml", SAMPLES, argv, description=__doc__.splitlines()[0], lower="lower_unchecked",
                          evaluate=lambda compiler: _evaluate, keep=KEPT_ELSEWHERE, documented=_documented,
                          verb="convert", defaults={"verify": "off"})


if __name__ == "__main__":
    sys.exit(main())
