"""ATen rewrites that express ops XNNPACK has no kernel for with ops it has.

ExecuTorch's XNNPACK partitioner declines ``native_layer_norm``, ``expand_copy``, ``squeeze_copy``,
``select_copy``, ``sum``, ``split_with_sizes_copy``, ``unsqueeze_copy`` except on the last dim, and
``mean.dim`` except over the two innermost dims of a 4-D tensor with ``keepdim``. A transformer
block is full of them, and ShuffleNet splits the channels of every block in two, so without
rewrites their XNNPACK regions are cut into a dozen delegates with other kernels in between, and
every cut costs a trip through the host. ExecuTorch's own passes do the same kind of rewrite
for other ops (``Conv1dUnsqueezePass`` turns a 1-D conv into a 2-D one for XNNPACK,
``RemoveNoopExpandCopyPass`` drops shape-preserving expands, and its Arm backend's
``ConvertSplitToSlicePass`` turns splits into slices); these cover the rest. Two more are about
Python scalar operands: the ``.Scalar`` overloads of add/sub/mul/div (which XNNPACK has no config
for; ``scaled_dot_product_attention`` decomposes to ``mul.Scalar``) become the ``.Tensor`` ones,
and in float16 graphs ``x * 0.125`` gets a constant of the tensor's dtype, where Edge would make a
float32 constant and a cast XNNPACK cannot run.

:data:`DECOMPOSITIONS` is a ``run_decompositions`` table applied to the ATen program before it is
converted to Edge, in capability (:meth:`XnnpackCompiler.support`) and in lowering
(:meth:`XnnpackCompiler.preprocess`) alike, so a node is claimed exactly when every op its rewrite
produces is one XNNPACK lowers, and is otherwise declined with the reason XNNPACK gives for that
op. Each entry returns ``NotImplemented`` for the cases XNNPACK takes as they are (or that cannot
be rewritten), which leaves the op unchanged. Every rewritten op records its source node through
``from_node``, which is how declines are reported against the original node.

The rewrites change the order of floating-point operations only in ``native_layer_norm`` (mean,
centred variance, ``rsqrt``: the textbook two-pass formula, the one ATen's CPU kernel uses too).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import torch

aten = torch.ops.aten


def _row_mean(rows: torch.Tensor, weight: float | None = None) -> torch.Tensor:
    """Mean (or, with ``weight=1``, sum) over the last dim of ``rows``, kept as a dim of size 1: a
    fully-connected layer with one output and weights ``1/d``, which takes any rank. (XNNPACK's
    own mean, global average pooling over the innermost two dims of ``[1, n, d, 1]``, needs a
    transpose to NHWC on each side: the zoo transformer loads 15% and runs 5% slower with it.)"""
    d = rows.shape[-1]
    return torch.nn.functional.linear(rows, torch.full((1, d), 1.0 / d if weight is None else weight, dtype=rows.dtype))


def _constant(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d constant in ``dtype`` (an ``aten.full`` node, folded by :func:`rewrite`). Edge turns a
    Python scalar operand into a float32 constant and a cast to the other operand's dtype, and
    XNNPACK has no float32 -> float16 cast."""
    return torch.full((), value, dtype=dtype)


def _scalar_as_tensor(tensor_op: Any, always: bool) -> Callable[..., Any]:
    """``op(x, number, ...)`` on a floating ``x`` -> ``tensor_op(x, constant, ...)`` with the
    number as a constant of ``x``'s dtype (see :func:`_constant`). ``always``: for the ``.Scalar``
    overloads, which XNNPACK has no config for; otherwise only for float16/bfloat16 ``x``."""

    def rewrite_scalar(x: Any, other: Any, *args: Any, **kwargs: Any) -> Any:
        if (isinstance(x, torch.Tensor) and x.dtype.is_floating_point
                and (always or x.dtype in (torch.float16, torch.bfloat16))
                and isinstance(other, (int, float)) and not isinstance(other, bool)):
            return tensor_op(x, _constant(other, x.dtype), *args, **kwargs)
        return NotImplemented

    return rewrite_scalar


def _layer_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> Any:
    if not x.dtype.is_floating_point or x.numel() == 0:
        return NotImplemented
    d = math.prod(normalized_shape)
    # over the last dim as it is (the usual case), or over the normalized dims flattened into one
    rows = x if len(normalized_shape) == 1 else x.reshape(x.numel() // d, d)
    mean = _row_mean(rows)
    centred = rows - mean
    rstd = torch.rsqrt(_row_mean(centred * centred) + _constant(eps, x.dtype))
    out = centred * rstd
    if len(normalized_shape) != 1:
        out = out.reshape(x.shape)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    stat_shape = [*x.shape[:x.dim() - len(normalized_shape)], *[1] * len(normalized_shape)]
    # native_layer_norm's statistics: unused in inference graphs, where they are dead code
    return out, mean.reshape(stat_shape), rstd.reshape(stat_shape)


def _reduce(x: torch.Tensor, dim: Sequence[int] | None, keepdim: bool, dtype: Any, weight: float | None) -> Any:
    """``mean`` (``weight=None``) or ``sum`` (``weight=1``) over ``dim``: the reduced dims moved
    last, flattened into rows, and :func:`_row_mean`."""
    if dtype is not None or x.dim() == 0 or x.numel() == 0 or not x.dtype.is_floating_point:
        return NotImplemented
    reduced = sorted({d % x.dim() for d in dim}) if dim else list(range(x.dim()))
    if weight is None and x.dim() == 4 and reduced == [2, 3] and keepdim:
        return NotImplemented  # XNNPACK's own case
    kept = [i for i in range(x.dim()) if i not in reduced]
    shape = [1 if i in reduced else x.shape[i] for i in range(x.dim())] if keepdim else [x.shape[i] for i in kept]
    if reduced == [x.dim() - 1]:  # the last dim: no data movement
        out = _row_mean(x, weight)
        return out if keepdim else out.reshape(shape)
    order = kept + reduced
    moved = x if order == list(range(x.dim())) else x.permute(order)
    n = math.prod(x.shape[i] for i in kept)
    return _row_mean(moved.reshape(n, math.prod(x.shape[i] for i in reduced)), weight).reshape(shape)


def _mean(x: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    return _reduce(x, dim, keepdim, dtype, None)


def _sum(x: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    return _reduce(x, dim, keepdim, dtype, 1.0)


def _squeezed_shape(x: torch.Tensor, dims: Sequence[int]) -> list[int]:
    drop = {d % x.dim() for d in dims} if x.dim() else set()
    return [s for i, s in enumerate(x.shape) if not (i in drop and s == 1)]


def _squeeze_dims(x: torch.Tensor, dim: Sequence[int]) -> torch.Tensor:
    return x.reshape(_squeezed_shape(x, dim))


def _squeeze_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.reshape(_squeezed_shape(x, [dim]))


def _squeeze(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(_squeezed_shape(x, range(x.dim())))


def _unsqueeze(x: torch.Tensor, dim: int) -> Any:
    dim = dim % (x.dim() + 1)
    if dim == x.dim():
        return NotImplemented  # XNNPACK's own case
    return x.reshape([*x.shape[:dim], 1, *x.shape[dim:]])


def _select(x: torch.Tensor, dim: int, index: int) -> torch.Tensor:
    dim %= x.dim()
    index %= x.shape[dim]
    shape = [s for i, s in enumerate(x.shape) if i != dim]
    return aten.slice.Tensor(x, dim, index, index + 1).reshape(shape)


def _split_with_sizes(x: torch.Tensor, split_sizes: Sequence[int], dim: int = 0) -> Any:
    """One ``slice`` per piece (XNNPACK's static slice), as ExecuTorch's Arm backend does
    (``ConvertSplitToSlicePass``). Empty pieces are left alone: XNNPACK refuses zero-sized tensors."""
    if x.dim() == 0 or 0 in split_sizes:
        return NotImplemented
    dim %= x.dim()
    starts = itertools.accumulate(split_sizes, initial=0)
    return [aten.slice.Tensor(x, dim, start, start + size) for start, size in zip(starts, split_sizes)]


def _expand(x: torch.Tensor, size: Sequence[int], *, implicit: bool = False) -> Any:
    if len(size) == x.dim() and all(s in (-1, have) for s, have in zip(size, x.shape)):
        return x  # expanding to its own shape: nothing to do
    return NotImplemented


#: The ``run_decompositions`` table (see the module docstring).
DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    aten.native_layer_norm.default: _layer_norm,
    aten.mean.dim: _mean,
    aten.sum.dim_IntList: _sum,
    aten.squeeze.dims: _squeeze_dims,
    aten.squeeze.dim: _squeeze_dim,
    aten.squeeze.default: _squeeze,
    aten.unsqueeze.default: _unsqueeze,
    aten.select.int: _select,
    aten.split_with_sizes.default: _split_with_sizes,
    aten.expand.default: _expand,
    **{getattr(aten, name).Tensor: _scalar_as_tensor(getattr(aten, name).Tensor, False)
       for name in ("add", "sub", "mul", "div")},
    **{getattr(aten, name).Scalar: _scalar_as_tensor(getattr(aten, name).Tensor, True)
       for name in ("add", "sub", "mul", "div")},
}


def rewrite(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with :data:`DECOMPOSITIONS` applied and every ``aten.full`` folded into a lifted
    constant (XNNPACK has no kernel for ``full``; ExecuTorch folds it only after partitioning).
    ``ep`` itself is not changed; it is returned as it is when it has none of those ops."""
    if not any(n.op == "call_function" and n.target in DECOMPOSITIONS for n in ep.graph.nodes):
        return ep
    return _fold_full(ep.run_decompositions(DECOMPOSITIONS))


def _fold_full(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Replace each ``aten.full`` node of ``ep`` (a fresh program: changed in place) with a lifted
    constant, the way ExecuTorch's ``constant_prop_pass`` lifts what it folds."""
    from executorch.exir.passes.constant_prop_pass import create_constant_nodes_and_return_specs

    fulls = {n: n.target(*n.args, **n.kwargs) for n in ep.graph.nodes
             if n.op == "call_function" and n.target is aten.full.default}
    if not fulls:
        return ep
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    specs.update(create_constant_nodes_and_return_specs(fulls, ep))
    ep.graph_signature.input_specs = [specs[n.name] for n in ep.graph.find_nodes(op="placeholder")]
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return ep
