"""Host ops: the only ops a program may run outside its delegates, through torch on the CPU.

A program file is untrusted input, and a host op is a function the file names. So the runtime
resolves host ops from :data:`HOST_OPS`, an explicit allow-list of pure, functional ops: each
returns new tensors computed from its arguments alone. None reads or writes files, none mutates
its inputs (no ``op_``/``a!`` schemas), none has an ``out=`` form, none is randomised, and none
returns uninitialised memory (``empty`` would leak whatever the allocator last held).
``tests/test_hostops.py`` checks every entry's schema against these rules in the installed
torch. ``partition`` refuses to leave any other op to the host, naming it and its namespace.

What is checked at load, before anything runs (:func:`check_instruction`): the op is on the list,
and torch's meta implementation of it, given the declared dtypes and shapes of its inputs and
the file's arguments, produces exactly the outputs the manifest declares. So no argument (an
``aten.full`` size, say) can make the host allocate more than the file declares, and the declared
sizes themselves are capped at load (:data:`handoff.limits.MAX_RUN_BYTES`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .errors import HandoffError, one_line

#: Namespaces host ops may come from, and the module that registers each namespace's ops when
#: torch does not on import.
NAMESPACES: dict[str, str | None] = {
    "aten": None,
    "quantized_decomposed": "torch.ao.quantization.fx._decomposed",
}

_ATEN = """
abs acos acosh adaptive_avg_pool1d _adaptive_avg_pool2d _adaptive_avg_pool3d add.Scalar add.Tensor addmm
alias amax amin any.default any.dim any.dims arange.default arange.start arange.start_step argmax argmin
asin asinh atan atan2 atanh avg_pool1d avg_pool2d avg_pool3d baddbmm bitwise_and.Scalar bitwise_and.Tensor
bitwise_not bitwise_or.Scalar bitwise_or.Tensor bitwise_xor.Scalar bitwise_xor.Tensor bmm cat ceil
clamp.default clamp.Tensor clamp_max.default clamp_min.default clone constant_pad_nd convolution
copy cos cosh cumprod cumsum diagonal digamma div.Scalar div.Scalar_mode div.Tensor div.Tensor_mode elu
embedding eq.Scalar eq.Tensor erf erfc erfinv exp exp2 expand expm1 fill.Scalar flip floor floor_divide
fmod.Scalar fmod.Tensor frac full full_like gather ge.Scalar ge.Tensor gelu glu grid_sampler_2d
gt.Scalar gt.Tensor hardsigmoid hardswish hardtanh index.Tensor index_put index_select isinf isnan
le.Scalar le.Tensor leaky_relu lgamma linear log log10 log1p log2 _log_softmax logical_and logical_not
logical_or logical_xor logit lt.Scalar lt.Tensor masked_fill.Scalar masked_fill.Tensor max.dim
max_pool2d_with_indices max_pool3d_with_indices maximum mean.default mean.dim min.dim minimum mm mul.Scalar
mul.Tensor _native_batch_norm_legit_no_training native_group_norm native_layer_norm ne.Scalar ne.Tensor
neg ones ones_like permute pixel_shuffle pixel_unshuffle pow.Scalar pow.Tensor_Scalar pow.Tensor_Tensor
prod.default prod.dim_int reciprocal reflection_pad1d reflection_pad2d reflection_pad3d relu remainder.Scalar
remainder.Tensor repeat replication_pad1d replication_pad2d replication_pad3d round.default rsqrt
scalar_tensor scatter.src scatter.value scatter_add scatter_reduce.two select.int select_scatter sigmoid
sign silu sin sinh slice.Tensor slice_scatter _softmax sort special_i0e special_i1 special_i1e
split_with_sizes sqrt squeeze.dim squeeze.dims sub.Scalar sub.Tensor sum.default sum.dim_IntList tan tanh
_to_copy topk tril triu trunc unsqueeze upsample_bilinear2d.vec upsample_nearest2d.vec var.correction
var.dim view where.self zeros zeros_like
"""
_QUANTIZED_DECOMPOSED = """
quantize_per_tensor.default quantize_per_tensor.tensor dequantize_per_tensor.default
dequantize_per_tensor.tensor quantize_per_channel.default dequantize_per_channel.default
choose_qparams.tensor
"""


def _qualified(namespace: str, names: str) -> set[str]:
    return {f"{namespace}.{n}" if "." in n else f"{namespace}.{n}.default" for n in names.split()}


#: ``namespace.op.overload`` of every op the runtime runs on the host.
HOST_OPS: frozenset[str] = frozenset(_qualified("aten", _ATEN) | _qualified("quantized_decomposed", _QUANTIZED_DECOMPOSED))


def refusal(target: str) -> str | None:
    """Why ``target`` (``namespace.op.overload``) cannot run on the host, or ``None``."""
    if target in HOST_OPS:
        return None
    namespace = target.split(".", 1)[0]
    if namespace not in NAMESPACES:
        return (f"host op {target!r} is in namespace '{namespace}', which the runtime never runs on the host "
                f"(namespaces: {', '.join(NAMESPACES)})")
    return f"host op {target!r} is not on the runtime's allow-list of pure ops (handoff.hostops.HOST_OPS)"


def resolve(target: str) -> Any:
    """The ``OpOverload`` for an allowed ``target``; :class:`HandoffError` otherwise (imports torch)."""
    why = refusal(target)
    if why:
        raise HandoffError(why)
    import importlib

    import torch

    namespace, packet, overload = target.split(".")
    if NAMESPACES[namespace]:
        importlib.import_module(NAMESPACES[namespace])  # registers the namespace's ops with torch
    op = getattr(getattr(getattr(torch.ops, namespace), packet, None), overload, None)
    if not isinstance(op, torch._ops.OpOverload):
        raise HandoffError(f"host op {target!r} does not exist in torch {torch.__version__}; "
                           f"re-partition with this torch version")
    return op


def check_instruction(op: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
                      decode: Callable[[Any, Callable[[int], Any]], Any],
                      inputs: Callable[[int], tuple[tuple[int, ...], str]],
                      outputs: Sequence[tuple[tuple[int, ...], str] | None]) -> str | None:
    """Run ``op`` on fake tensors shaped like its declared inputs and compare what it would
    produce with the declared ``outputs`` (``None`` entries are unused outputs). Returns why the
    instruction is refused, or ``None``. Allocates nothing: under torch's ``FakeTensorMode`` every
    tensor, factory ops' outputs included, is metadata without storage.

    :param decode: the runtime's argument decoder, called with a function that makes the tensor
        for a value id.
    :param inputs: value id -> declared (shape, dtype) of the value.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fake(vid: int) -> Any:
        shape, dtype = inputs(vid)
        return torch.empty(shape, dtype=getattr(torch, dtype))

    try:
        with torch.no_grad(), FakeTensorMode():
            result = op(*decode(list(args), fake), **{k: decode(v, fake) for k, v in kwargs.items()})
    except Exception as exc:
        return f"its arguments are invalid for {op}: {one_line(exc, 200)}"
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(results) != len(outputs):
        return f"it produces {len(results)} value(s), the manifest declares {len(outputs)}"
    for i, (got, want) in enumerate(zip(results, outputs)):
        if want is None:
            continue
        if not isinstance(got, torch.Tensor):
            return f"output {i} is {type(got).__name__}, not a tensor"
        shape, dtype = want
        if tuple(got.shape) != tuple(shape) or str(got.dtype).removeprefix("torch.") != dtype:
            return (f"output {i} would be {str(got.dtype).removeprefix('torch.')}{list(got.shape)}, "
                    f"the manifest declares {dtype}{list(shape)}")
    return None
