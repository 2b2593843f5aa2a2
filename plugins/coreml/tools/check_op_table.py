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

import argparse
import dataclasses
import json
import math
import operator
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plugin's source tree

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from handoff import Plugins  # noqa: E402
from handoff_coreml import capability, reference  # noqa: E402

A = torch.ops.aten
AUX = {operator.getitem, A._assert_tensor_metadata.default}
#: Ops other backends keep whole (xnnpack: linear, hardswish, max_pool2d, upsample_bilinear2d):
#: the capability check sees them undecomposed when those backends are selected too.
KEPT_ELSEWHERE = (A.linear.default, A.hardswish.default, A.max_pool2d.default, A.upsample_bilinear2d.vec)


@dataclasses.dataclass
class Sample:
    op: Any
    label: str
    fn: Callable[..., Any]
    inputs: tuple[Any, ...]
    module: torch.nn.Module | None = None
    allow: tuple[Any, ...] = ()  # other ops the sample needs


SAMPLES: list[Sample] = []
_gen = torch.Generator().manual_seed(0)


def r(*shape: int, dtype: torch.dtype = torch.float32, lo: float | None = None) -> torch.Tensor:
    t = torch.randn(*shape, generator=_gen)
    if lo is not None:
        t = t.abs() + lo
    return t.to(dtype)


def ri(*shape: int, hi: int = 9, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.randint(-hi, hi, shape, generator=_gen).to(dtype)


def rb(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen) > 0.5


def S(op: Any, label: str, fn: Callable[..., Any], *inputs: Any, module: torch.nn.Module | None = None,
      allow: tuple[Any, ...] = ()) -> None:
    SAMPLES.append(Sample(op, label, fn, inputs, module, allow))


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


# -- the check --------------------------------------------------------------------------------------
class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def _exported(sample: Sample, keep: tuple[Any, ...]) -> torch.export.ExportedProgram:
    module = sample.module if sample.module is not None else _Fn(sample.fn)
    table = torch.export.default_decompositions()
    for op in (*KEPT_ELSEWHERE, *keep):
        table.pop(op, None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module.eval(), sample.inputs, strict=False).run_decompositions(table)


def _matches(got: list[np.ndarray], want: Any, tol: float) -> str | None:
    want = [w for w in torch.utils._pytree.tree_leaves(want) if isinstance(w, torch.Tensor)]
    if len(got) != len(want):
        return f"{len(got)} outputs, eager has {len(want)}"
    for g, w in zip(got, want):
        w = w.detach().numpy()
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"output {g.dtype}{list(g.shape)}, eager {w.dtype}{list(w.shape)}"
        if w.dtype.kind in "biu":
            if not np.array_equal(g, w):
                return f"{int((g != w).sum())} of {w.size} values differ"
            continue
        scale = float(np.abs(w[np.isfinite(w)]).max(initial=0.0)) or 1.0
        gg, ww = g.astype(np.float64), w.astype(np.float64)
        if not np.allclose(gg, ww, rtol=tol, atol=tol * scale, equal_nan=True):
            err = float(np.nanmax(np.abs(gg - ww))) / scale
            return f"max error {err:.1e} of the largest magnitude (tolerance {tol:g})"
    return None


def _eager_in_float16(module: torch.nn.Module, inputs: tuple[Any, ...], like: Any) -> Any:
    """Eager torch computing in float16 (float32 inputs and weights rounded to float16), as an fp16
    ML Program computes, with the dtypes of ``like`` (the float32 outputs); ``None`` where torch
    has no float16 kernel."""
    import copy

    def half(x: Any) -> Any:
        return x.half() if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x

    try:
        with torch.no_grad():
            out = copy.deepcopy(module).half()(*[half(x) for x in inputs])
    except (RuntimeError, NotImplementedError):
        return None
    return [t.to(w.dtype) for t, w in zip(_tensors(out), _tensors(like))]


def _tensors(values: Any) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]


def check(sample: Sample, compiler: Any) -> dict[str, Any]:
    ep = _exported(sample, tuple(compiler.ops_to_not_decompose()))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    mine = [n for n in nodes if n.target == sample.op]
    others = sorted({capability.op_name(n.target) for n in nodes
                     if n.target != sample.op and n.target not in AUX and n.target not in sample.allow})
    row: dict[str, Any] = {"op": capability.op_name(sample.op), "sample": sample.label}
    if not mine or others:
        row.update(verdict="bad sample", detail=f"graph has {row['op']} x{len(mine)} and {others}")
        return row
    reasons = compiler.support(ep)
    declined = [reasons[n.name] for n in mine if reasons[n.name]]
    declined += [r for n, r in reasons.items() if r and n not in {m.name for m in mine}]  # its neighbours
    row["claimed"] = not declined
    row["reason"] = declined[0] if declined else None
    documented = any(n.target in capability.KNOWN_BAD or (n.target in (A.argmax.default, A.argmin.default)
                                                           and "crashes Core ML" in (reasons[n.name] or ""))
                     for n in mine)
    fp16 = compiler.precision == "fp16" or any(
        isinstance(v, torch.Tensor) and v.dtype == torch.float16 for v in sample.inputs)
    tol = 1e-12 if any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in sample.inputs) else (
        1e-2 if fp16 else 1e-4)
    try:
        lowered = compiler.lower_unchecked(ep, sample.label)
    except Exception as exc:
        row.update(works=False, detail="convert: " + " ".join(str(exc).split())[:200])
    else:
        row["mil_ops"] = lowered.metadata["mil_ops"]
        try:
            got = reference.evaluate(lowered.blob, [t.numpy() for t in sample.inputs])
        except reference.NotEvaluable as exc:
            row.update(works=True, evaluated=False, detail=f"converts; numerics not checkable here (no numpy "
                                                           f"implementation of MIL {', '.join(exc.ops)})")
        except Exception as exc:
            row.update(works=False, detail="evaluate: " + " ".join(str(exc).split())[:200])
        else:
            module = sample.module if sample.module is not None else _Fn(sample.fn)
            with torch.no_grad():
                want = module(*sample.inputs)
            wrong = _matches(got, want, tol)
            if wrong and fp16:  # rounding ops (floor, trunc) and steep ones (tan) amplify float16 rounding
                half = _eager_in_float16(module, sample.inputs, want)
                if half is not None and _matches(got, half, tol) is None:
                    wrong = None
            row.update(works=wrong is None, evaluated=True,
                       detail=("numerics: " + wrong) if wrong else "converts and matches eager")
    if documented and not row["claimed"]:
        row["verdict"] = "documented (device-only bug, declined)"
    elif row["claimed"] == row["works"]:
        row["verdict"] = "agree" if row.get("evaluated") or not row["works"] else "agree (conversion only)"
    else:
        row["verdict"] = ("MISMATCH: claimed, but it fails" if row["claimed"]
                          else "MISMATCH: declined, but it converts" + (" and matches" if row.get("evaluated") else ""))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="coreml compile option (precision=fp32, deployment_target=iOS17)")
    parser.add_argument("-k", default="", help="only samples whose op or label contains this text")
    parser.add_argument("--json", metavar="FILE", help="write every row as JSON")
    parser.add_argument("--verbose", action="store_true", help="print agreeing rows too")
    args = parser.parse_args(argv)
    options = dict(o.split("=", 1) for o in args.option)
    options.setdefault("verify", "off")
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-coreml-check-"))
    pm = Plugins(autoload=False, extra=["handoff_coreml.plugin"])
    compiler = pm.compiler("coreml", options)
    rows = []
    start = time.perf_counter()
    for sample in SAMPLES:
        if args.k and args.k not in sample.label and args.k not in capability.op_name(sample.op):
            continue
        try:
            row = check(sample, compiler)
        except Exception as exc:  # a crash of the capability check itself is a finding, not the end of the run
            row = {"op": capability.op_name(sample.op), "sample": sample.label,
                   "verdict": "ERROR: the check crashed", "detail": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        if args.verbose or not row["verdict"].startswith("agree"):
            claim = "claimed" if row.get("claimed") else f"declined ({row.get('reason')})" if "claimed" in row else ""
            print(f"{row['verdict']:<44} {row['op']:<48} {row['sample']:<44} {claim} -> {row.get('detail', '')}")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in
              ("agree", "agree (conversion only)", "documented (device-only bug, declined)")}
    bad = [r for r in rows if not r["verdict"].startswith(("agree", "documented"))]
    print(f"\n{len(rows)} samples over {len({r['op'] for r in rows})} ops, options {options}: "
          f"{counts['agree']} agree (converted and, where claimed, numerically checked), "
          f"{counts['agree (conversion only)']} agree (claimed and converted; numerics not checkable here), "
          f"{counts['documented (device-only bug, declined)']} documented device-only declines, "
          f"{len(bad)} mismatch(es); {sum(bool(r.get('claimed')) for r in rows)} claimed; "
          f"{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": options, "rows": rows}, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
