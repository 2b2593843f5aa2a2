"""The conformance catalogue: single ops and small blocks as data plus tiny ``nn.Module``\\ s.

Each :class:`Case` names the dimensions it uses (:data:`DIMS`: a fixed value and the range
hypothesis draws from), its inputs as shape templates over those dimensions, the module it builds
from them, and the dtypes it runs in: ``float32`` and ``float16`` for float cases, ``int32`` too
where the op is defined on integers; quantized patterns (``quantized_decomposed`` q/dq around a
float op, as PT2E quantization leaves them) run in float32 and are compared with the ``qdq`` row
of :data:`handoff.testing.TOLERANCE`. :func:`zoo_cases` adds every ``zoo:`` model.

A float16 variant is the float32 module and inputs rounded to float16; it is compared with the
float32 module on the same rounded weights and inputs, so the reference itself adds no error.

Weights are random but not degenerate: norms get random statistics, and outputs change with the
input (``tests/test_conformance.py`` checks every case). Imports torch: loaded by the suite only.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  -- registers quantized_decomposed ops
from torch import nn

F = nn.functional
QD = torch.ops.quantized_decomposed

FLOAT = ("float32", "float16")
FLOAT_INT = ("float32", "float16", "int32")
FP32 = ("float32",)
#: Every dtype a case can run in (the suite's ``--handoff-dtypes`` chooses among these).
DTYPES = ("float32", "float16", "int32")


@dataclasses.dataclass(frozen=True)
class Dim:
    """One dimension: hypothesis draws it from ``lo..hi``; the fixed pass uses ``fixed``."""

    lo: int
    hi: int
    fixed: int


#: The dimensions cases are written over.
DIMS = {
    "N": Dim(1, 3, 2),     # batch
    "C": Dim(1, 8, 4),     # channels in
    "G": Dim(1, 8, 6),     # channels out / hidden
    "H": Dim(3, 12, 8),    # height
    "W": Dim(3, 12, 7),    # width
    "L": Dim(3, 24, 12),   # sequence length (1-d signals)
    "F": Dim(1, 24, 16),   # features
    "T": Dim(1, 8, 5),     # tokens / time steps
    "h": Dim(1, 4, 2),     # attention heads
    "D": Dim(2, 12, 8),    # head dim
    "V": Dim(2, 40, 20),   # vocabulary / table size
}

#: What a template entry may be: a dimension name, a number, or a function of the dimensions.
Extent = str | int | Callable[[Mapping[str, int]], int]


@dataclasses.dataclass(frozen=True)
class Input:
    """One input: its shape template and how its values are drawn.

    ``kind``: ``normal`` (standard normal; integers from -8..8 in the int32 variant), ``positive``
    (0.5..2.5; 1..8), ``unit`` (-0.9..0.9), ``index:DIM`` (int64 in ``0..DIM-1``) or ``mask``
    (bool). Float kinds follow the variant's dtype; index and mask inputs keep theirs.
    """

    shape: tuple[Extent, ...]
    kind: str = "normal"

    def resolve(self, d: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(_extent(e, d) for e in self.shape)


def _extent(e: Extent, d: Mapping[str, int]) -> int:
    if isinstance(e, int):
        return e
    if isinstance(e, str):
        return d[e]
    return int(e(d))


def I(*shape: Extent, kind: str = "normal") -> Input:  # noqa: E743 - reads like a shape in the table
    return Input(tuple(shape), kind)


@dataclasses.dataclass(frozen=True)
class Case:
    """One entry of the catalogue.

    :param name: unique, stable id (xfail and expect files name it).
    :param category: the group in reports (``elementwise``, ``conv``, ...).
    :param make: ``make(dims) -> nn.Module``; called after seeding torch from the name.
    :param inputs: the module's inputs.
    :param dtypes: the dtypes the case runs in.
    :param dims: the dimensions the case uses beyond those its inputs name (``make`` may read only
        these and the inputs' ones).
    :param tolerance: the row of ``handoff.testing.TOLERANCE`` to compare outputs with, when not
        the variant's dtype (quantized patterns: ``qdq``).
    :param fixed: dimensions whose fixed value differs from :data:`DIMS` for this case.
    """

    name: str
    category: str
    make: Callable[[Mapping[str, int]], nn.Module]
    inputs: tuple[Input, ...]
    dtypes: tuple[str, ...] = FLOAT
    dims: tuple[str, ...] = ()
    tolerance: str | None = None
    fixed: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def dim_names(self) -> tuple[str, ...]:
        """The dimensions the inputs' templates read (found by resolving them) and :attr:`dims`."""
        seen = _Recording()
        for inp in self.inputs:
            inp.resolve(seen)
            if inp.kind.startswith("index:"):
                seen[inp.kind[6:]]
        return tuple(dict.fromkeys([*seen.read, *self.dims]))

    @property
    def drawable(self) -> bool:
        """Whether hypothesis has dimensions to draw (zoo models have none)."""
        return bool(self.dim_names)

    def fixed_dims(self) -> dict[str, int]:
        return {n: self.fixed.get(n, DIMS[n].fixed) for n in self.dim_names}

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) & 0x7FFFFFFF

    def build(self, dims: Mapping[str, int]) -> nn.Module:
        """The float32 module for ``dims``, with this case's weights (seeded by its name)."""
        torch.manual_seed(self.seed)
        module = self.make(_Strict(dims, self.name))
        return (module if self.category == "zoo" else _randomize_norms(module, self.seed)).eval()

    def input_shapes(self, dims: Mapping[str, int]) -> list[tuple[tuple[int, ...], str]]:
        return [(inp.resolve(dims), inp.kind) for inp in self.inputs]


class _Recording(dict):
    """Fixed values of :data:`DIMS`, remembering which were read."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[str] = []

    def __missing__(self, key: str) -> int:
        self.read.append(key)
        return DIMS[key].fixed


class _Strict(dict):
    """The dimensions a ``make`` function sees: reading one the case did not declare is a bug in
    the catalogue, said at once rather than a KeyError deep in a module's constructor."""

    def __init__(self, dims: Mapping[str, int], case: str):
        super().__init__(dims)
        self.case = case

    def __missing__(self, key: str) -> int:
        raise KeyError(f"case {self.case!r} reads dimension {key!r}; declare it in Case.dims")


def random_values(shape: Sequence[int], kind: str, dtype: str, dims: Mapping[str, int],
                  gen: torch.Generator) -> torch.Tensor:
    """Values for one input of ``kind`` (see :class:`Input`) in the variant ``dtype``."""
    if kind.startswith("index:"):
        return torch.randint(0, dims[kind[6:]], tuple(shape), generator=gen)
    if kind == "mask":
        return torch.rand(tuple(shape), generator=gen) > 0.5
    if kind.startswith("zoo:"):  # a zoo model's integer input: small non-negative values, as handoff.zoo
        return torch.randint(0, 8, tuple(shape), generator=gen).to(getattr(torch, kind[4:]))
    if dtype == "int32":
        lo, hi = {"normal": (-8, 9), "positive": (1, 9), "unit": (-1, 2)}[kind]
        return torch.randint(lo, hi, tuple(shape), generator=gen, dtype=torch.int32)
    if kind == "normal":
        x = torch.randn(tuple(shape), generator=gen)
    elif kind == "positive":
        x = torch.rand(tuple(shape), generator=gen) * 2.0 + 0.5
    elif kind == "unit":
        x = torch.rand(tuple(shape), generator=gen) * 1.8 - 0.9
    else:
        raise ValueError(f"unknown input kind {kind!r}")
    return x.to(getattr(torch, dtype))


def _randomize_norms(module: nn.Module, seed: int) -> nn.Module:
    """Norm layers with random statistics and affine parameters (fresh ones are the identity,
    which would let a backend that skips them pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
                weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
                if weight is not None:
                    weight.copy_(torch.rand(weight.shape, generator=gen) * 0.5 + 0.75)
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.2)
    return module


class Fn(nn.Module):
    """A function of the inputs as a module (the op under test, nothing else)."""

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


class Weighted(nn.Module):
    """A function of the inputs and one weight tensor (prelu's slope, a gather table...)."""

    def __init__(self, fn: Callable[..., Any], shape: Sequence[int], scale: float = 1.0, offset: float = 0.0):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(tuple(shape)) * scale + offset)

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args, self.weight)


CASES: list[Case] = []


def fn(name: str, category: str, f: Callable[..., Any], *inputs: Input, **kw: Any) -> None:
    """A case whose module is the function ``f`` of its inputs."""
    CASES.append(Case(name, category, lambda d, f=f: Fn(f), tuple(inputs), **kw))


def mod(name: str, category: str, make: Callable[[Mapping[str, int]], nn.Module], *inputs: Input, **kw: Any) -> None:
    """A case whose module ``make(dims)`` builds (weights seeded by the case's name)."""
    CASES.append(Case(name, category, make, tuple(inputs), **kw))


NC = I("N", "C")
NCL = I("N", "C", "L")
NCHW = I("N", "C", "H", "W")
NTF = I("N", "T", "F")

# -- elementwise ------------------------------------------------------------------------------------
fn("add", "elementwise", torch.add, NC, NC, dtypes=FLOAT_INT)
fn("sub", "elementwise", torch.sub, NCHW, NCHW, dtypes=FLOAT_INT)
fn("mul", "elementwise", torch.mul, NCL, NCL, dtypes=FLOAT_INT)
fn("div", "elementwise", torch.div, NC, I("N", "C", kind="positive"))
fn("add_alpha", "elementwise", lambda x, y: torch.add(x, y, alpha=2), NC, NC, dtypes=FLOAT_INT)
fn("add_broadcast", "elementwise", torch.add, NCHW, I("C", 1, 1), dtypes=FLOAT_INT)
fn("mul_broadcast_row", "elementwise", torch.mul, NCL, I("N", 1, "L"))
fn("add_scalar", "elementwise", lambda x: x + 1.5, NCHW)
fn("mul_scalar", "elementwise", lambda x: x * 3, NC, dtypes=FLOAT_INT)
fn("rsub_scalar", "elementwise", lambda x: 1.0 - x, NC)
fn("div_scalar", "elementwise", lambda x: x / 4.0, NCL)
fn("pow_2", "elementwise", lambda x: x ** 2, NC)
fn("pow_tensor", "elementwise", torch.pow, I("N", "C", kind="positive"), I("N", "C", kind="unit"))
fn("sqrt", "elementwise", torch.sqrt, I("N", "C", "L", kind="positive"))
fn("rsqrt", "elementwise", torch.rsqrt, I("N", "C", kind="positive"))
fn("reciprocal", "elementwise", torch.reciprocal, I("N", "C", kind="positive"))
fn("exp", "elementwise", torch.exp, NC)
fn("log", "elementwise", torch.log, I("N", "C", kind="positive"))
fn("abs", "elementwise", torch.abs, NCL, dtypes=FLOAT_INT)
fn("neg", "elementwise", torch.neg, NC, dtypes=FLOAT_INT)
fn("sin", "elementwise", torch.sin, NCL)
fn("cos", "elementwise", torch.cos, NC)
fn("erf", "elementwise", torch.erf, NC)
fn("floor", "elementwise", lambda x: torch.floor(x * 3.0), NC)
fn("ceil", "elementwise", lambda x: torch.ceil(x * 3.0), NC)
fn("round", "elementwise", lambda x: torch.round(x * 3.0), NC)
fn("sign", "elementwise", torch.sign, NC)
fn("maximum", "elementwise", torch.maximum, NCL, NCL, dtypes=FLOAT_INT)
fn("minimum", "elementwise", torch.minimum, NC, NC, dtypes=FLOAT_INT)
fn("clamp", "elementwise", lambda x: torch.clamp(x, -2, 3), NCHW, dtypes=FLOAT_INT)
fn("where", "elementwise", torch.where, I("N", "C", kind="mask"), NC, NC, dtypes=FLOAT_INT)
fn("masked_fill", "elementwise", lambda x, m: x.masked_fill(m, -4.0), NCL, I("N", "C", "L", kind="mask"))
fn("gt", "elementwise", torch.gt, NC, NC, dtypes=FLOAT_INT)
fn("eq_scalar", "elementwise", lambda x: x == 0, I("N", "C", kind="unit"), dtypes=("int32",))  # -1..1: a third true
fn("le_select", "elementwise", lambda x, y: torch.where(x <= y, x, y * 2.0), NCL, NCL)

# -- activations ------------------------------------------------------------------------------------
fn("relu", "activation", torch.relu, NCHW, dtypes=FLOAT_INT)
fn("relu6", "activation", F.relu6, NCHW)
fn("leaky_relu", "activation", lambda x: F.leaky_relu(x, 0.1), NCL)
fn("elu", "activation", F.elu, NC)
fn("selu", "activation", F.selu, NC)
fn("celu", "activation", lambda x: F.celu(x, 0.5), NC)
fn("gelu", "activation", F.gelu, NTF)
fn("gelu_tanh", "activation", lambda x: F.gelu(x, approximate="tanh"), NTF)
fn("silu", "activation", F.silu, NCHW)
fn("mish", "activation", F.mish, NC)
fn("hardswish", "activation", F.hardswish, NCHW)
fn("hardsigmoid", "activation", F.hardsigmoid, NC)
fn("hardtanh", "activation", lambda x: F.hardtanh(x, -0.5, 1.5), NC)
fn("sigmoid", "activation", torch.sigmoid, NCL)
fn("tanh", "activation", torch.tanh, NC)
fn("softplus", "activation", F.softplus, NC)
fn("softsign", "activation", F.softsign, NC)
fn("logsigmoid", "activation", F.logsigmoid, NC)
fn("glu", "activation", lambda x: F.glu(x, -1), I("N", lambda d: 2 * d["C"]))
fn("hardshrink", "activation", lambda x: F.hardshrink(x, 0.5), NC)
mod("prelu", "activation", lambda d: nn.PReLU(d["C"], init=0.2), NCHW)

# -- convolutions -----------------------------------------------------------------------------------
mod("conv1d", "conv", lambda d: nn.Conv1d(d["C"], d["G"], 3), NCL, dims=("G",))
mod("conv1d_stride_dilation", "conv", lambda d: nn.Conv1d(d["C"], d["G"], 3, stride=2, dilation=2, padding=2),
    NCL, dims=("G",))
mod("conv1d_depthwise", "conv", lambda d: nn.Conv1d(d["C"], d["C"], 5, padding=2, groups=d["C"]), NCL)
mod("conv2d", "conv", lambda d: nn.Conv2d(d["C"], d["G"], 3, padding=1), NCHW, dims=("G",))
mod("conv2d_no_bias", "conv", lambda d: nn.Conv2d(d["C"], d["G"], 3, bias=False), NCHW, dims=("G",))
mod("conv2d_stride2", "conv", lambda d: nn.Conv2d(d["C"], d["G"], 3, stride=2, padding=1), NCHW, dims=("G",))
mod("conv2d_dilation", "conv", lambda d: nn.Conv2d(d["C"], d["G"], 3, dilation=2, padding=2), NCHW, dims=("G",))
mod("conv2d_depthwise", "conv", lambda d: nn.Conv2d(d["C"], d["C"], 3, padding=1, groups=d["C"]), NCHW)
mod("conv2d_groups", "conv", lambda d: nn.Conv2d(2 * d["C"], 2 * d["G"], 3, padding=1, groups=2),
    I("N", lambda d: 2 * d["C"], "H", "W"), dims=("G",))
mod("conv2d_pointwise", "conv", lambda d: nn.Conv2d(d["C"], d["G"], 1), NCHW, dims=("G",))
mod("conv2d_rect_kernel", "conv", lambda d: nn.Conv2d(d["C"], d["G"], (1, 3), padding=(0, 1)), NCHW, dims=("G",))
mod("conv2d_same", "conv", lambda d: nn.Conv2d(d["C"], d["G"], 3, padding="same"), NCHW, dims=("G",))
mod("conv_transpose1d", "conv", lambda d: nn.ConvTranspose1d(d["C"], d["G"], 3, stride=2), NCL, dims=("G",))
mod("conv_transpose2d", "conv", lambda d: nn.ConvTranspose2d(d["C"], d["G"], 3, padding=1), NCHW, dims=("G",))
mod("conv_transpose2d_stride2", "conv", lambda d: nn.ConvTranspose2d(d["C"], d["G"], 2, stride=2), NCHW,
    dims=("G",))
mod("conv_transpose2d_output_padding", "conv",
    lambda d: nn.ConvTranspose2d(d["C"], d["G"], 3, stride=2, padding=1, output_padding=1), NCHW, dims=("G",))
mod("conv3d", "conv", lambda d: nn.Conv3d(d["C"], d["G"], 3, padding=1), I("N", "C", 4, "H", "W"), dims=("G",),
    fixed={"H": 5, "W": 5})

# -- pooling ----------------------------------------------------------------------------------------
fn("max_pool1d", "pool", lambda x: F.max_pool1d(x, 2), NCL)
fn("avg_pool1d", "pool", lambda x: F.avg_pool1d(x, 3, stride=2), NCL)
fn("max_pool2d", "pool", lambda x: F.max_pool2d(x, 2), NCHW)
fn("max_pool2d_stride1_pad", "pool", lambda x: F.max_pool2d(x, 3, stride=1, padding=1), NCHW)
fn("max_pool2d_ceil", "pool", lambda x: F.max_pool2d(x, 2, ceil_mode=True), NCHW)
fn("avg_pool2d", "pool", lambda x: F.avg_pool2d(x, 2), NCHW)
fn("avg_pool2d_pad_exclude", "pool", lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
   NCHW)
fn("adaptive_avg_pool1d", "pool", lambda x: F.adaptive_avg_pool1d(x, 1), NCL)
fn("adaptive_avg_pool2d_1", "pool", lambda x: F.adaptive_avg_pool2d(x, 1), NCHW)
fn("adaptive_avg_pool2d_2", "pool", lambda x: F.adaptive_avg_pool2d(x, 2), I("N", "C", lambda d: 2 * d["H"],
                                                                            lambda d: 2 * d["W"]))
fn("adaptive_max_pool2d", "pool", lambda x: F.adaptive_max_pool2d(x, 1), NCHW)
fn("global_mean", "pool", lambda x: x.mean((2, 3)), NCHW)

# -- normalisation ----------------------------------------------------------------------------------
mod("batch_norm1d", "norm", lambda d: nn.BatchNorm1d(d["C"]), NCL)
mod("batch_norm2d", "norm", lambda d: nn.BatchNorm2d(d["C"]), NCHW)
mod("layer_norm", "norm", lambda d: nn.LayerNorm(d["F"]), NTF)
mod("layer_norm_no_affine", "norm", lambda d: nn.LayerNorm(d["F"], elementwise_affine=False), NTF)
mod("group_norm", "norm", lambda d: nn.GroupNorm(2, 2 * d["C"]), I("N", lambda d: 2 * d["C"], "H", "W"))
mod("instance_norm2d", "norm", lambda d: nn.InstanceNorm2d(d["C"], affine=True), NCHW)
mod("rms_norm", "norm", lambda d: nn.RMSNorm(d["F"]), NTF)
fn("l2_normalize", "norm", lambda x: F.normalize(x, dim=-1), NTF)

# -- linear algebra ---------------------------------------------------------------------------------
mod("linear", "linear", lambda d: nn.Linear(d["F"], d["G"]), I("N", "F"), dims=("G",))
mod("linear_no_bias", "linear", lambda d: nn.Linear(d["F"], d["G"], bias=False), I("N", "F"), dims=("G",))
mod("linear_3d", "linear", lambda d: nn.Linear(d["F"], d["G"]), NTF, dims=("G",))
fn("matmul", "linear", torch.matmul, I("N", "F"), I("F", "G"))
fn("matmul_broadcast", "linear", torch.matmul, I("N", "T", "F"), I("F", "G"))
fn("matmul_vector", "linear", torch.matmul, I("N", "F"), I("F"))
fn("bmm", "linear", torch.bmm, I("N", "T", "F"), I("N", "F", "G"))
fn("addmm", "linear", lambda b, x, y: torch.addmm(b, x, y), I("G"), I("N", "F"), I("F", "G"))
fn("baddbmm", "linear", lambda b, x, y: torch.baddbmm(b, x, y, alpha=0.5), I("N", "T", "G"), I("N", "T", "F"),
   I("N", "F", "G"))
fn("einsum_bij_bjk", "linear", lambda x, y: torch.einsum("bij,bjk->bik", x, y), I("N", "T", "F"), I("N", "F", "G"))

# -- reductions -------------------------------------------------------------------------------------
fn("sum_dim", "reduction", lambda x: x.sum(-1), NCL, dtypes=FLOAT_INT)
fn("sum_all", "reduction", lambda x: x.sum(), NC)
fn("mean_dim", "reduction", lambda x: x.mean(1), NCL)
fn("mean_keepdim", "reduction", lambda x: x.mean(-1, keepdim=True), NTF)
fn("amax", "reduction", lambda x: x.amax(-1), NCL, dtypes=FLOAT_INT)
fn("amin", "reduction", lambda x: x.amin(1), NCL)
fn("max_dim", "reduction", lambda x: x.max(1).values, NCL)
fn("prod_dim", "reduction", lambda x: x.prod(1), I("N", "C", kind="unit"))
fn("var", "reduction", lambda x: x.var(-1), NTF)
fn("std_unbiased_false", "reduction", lambda x: x.std(-1, unbiased=False), NTF)
fn("argmax", "reduction", lambda x: x.argmax(-1), NCL)
fn("argmin", "reduction", lambda x: x.argmin(1), NCL)
fn("logsumexp", "reduction", lambda x: torch.logsumexp(x, -1), NTF)
fn("vector_norm", "reduction", lambda x: torch.linalg.vector_norm(x, dim=-1), NTF)
fn("cumsum", "reduction", lambda x: torch.cumsum(x, -1), NCL)

# -- softmax ----------------------------------------------------------------------------------------
fn("softmax", "softmax", lambda x: torch.softmax(x, -1), NTF)
fn("softmax_dim1", "softmax", lambda x: torch.softmax(x, 1), NCHW)
fn("log_softmax", "softmax", lambda x: torch.log_softmax(x, -1), NTF)
fn("softmax_scaled", "softmax", lambda x: torch.softmax(x * 0.125, -1), I("N", "h", "T", "T"))

# -- shape ------------------------------------------------------------------------------------------
fn("reshape", "shape", lambda x: x.reshape(x.shape[0], -1) * 2, NCHW, dtypes=FLOAT_INT)
fn("flatten", "shape", lambda x: torch.flatten(x, 1) + 1, NCHW)
fn("permute", "shape", lambda x: x.permute(0, 2, 3, 1) * 2, NCHW, dtypes=FLOAT_INT)
fn("transpose", "shape", lambda x: x.transpose(1, 2) - 1, NTF, dtypes=FLOAT_INT)
fn("squeeze", "shape", lambda x: x.squeeze(1) * 2, I("N", 1, "L"))
fn("unsqueeze", "shape", lambda x: x.unsqueeze(1) * 2, NCL)
fn("expand", "shape", lambda x: x.expand(-1, -1, 4) + 1, I("N", "C", 1), dtypes=FLOAT_INT)
fn("repeat", "shape", lambda x: x.repeat(1, 2, 3), NCL)
fn("flip", "shape", lambda x: torch.flip(x, (-1,)), NCL, dtypes=FLOAT_INT)
fn("roll", "shape", lambda x: torch.roll(x, 2, -1), NCL)
fn("pixel_shuffle", "shape", lambda x: F.pixel_shuffle(x, 2), I("N", lambda d: 4 * d["C"], "H", "W"))
fn("pixel_unshuffle", "shape", lambda x: F.pixel_unshuffle(x, 2), I("N", "C", lambda d: 2 * d["H"],
                                                                       lambda d: 2 * d["W"]))
fn("movedim", "shape", lambda x: torch.movedim(x, 1, -1).contiguous() * 2, NCHW)

# -- cat, split, slice, gather, index ---------------------------------------------------------------
fn("cat", "index", lambda x, y: torch.cat([x, y], 1), NC, I("N", "G"), dtypes=FLOAT_INT)
fn("cat_three", "index", lambda x, y, z: torch.cat([x, y, z], -1), NCL, NCL, NCL)
fn("stack", "index", lambda x, y: torch.stack([x, y], 1), NCL, NCL)
fn("split", "index", lambda x: [t * 2 for t in torch.split(x, 2, dim=-1)], I("N", "C", lambda d: 2 * d["L"]))
fn("split_sizes", "index", lambda x: [t + 1 for t in torch.split(x, [1, x.shape[1] - 1], 1)],
   I("N", lambda d: d["C"] + 1, "L"))
fn("chunk", "index", lambda x: [t * 3 for t in torch.chunk(x, 2, 1)], I("N", lambda d: 2 * d["C"], "L"))
fn("slice", "index", lambda x: x[:, 1:-1] * 2, I("N", lambda d: d["C"] + 2, "L"), dtypes=FLOAT_INT)
fn("slice_step", "index", lambda x: x[:, :, ::2] + 1, NCL)
fn("select", "index", lambda x: x[:, 0] * 2, NCL)
fn("narrow", "index", lambda x: torch.narrow(x, -1, 1, 2) * 2, NCL)
fn("unbind", "index", lambda x: [t * (i + 1) for i, t in enumerate(torch.unbind(x, 1))], I("N", 3, "L"))
fn("gather", "index", lambda x, i: torch.gather(x, 1, i), NCL, I("N", "C", "L", kind="index:C"), dtypes=FLOAT_INT)
fn("index_select", "index", lambda x, i: torch.index_select(x, 1, i), NCL, I("T", kind="index:C"),
   dtypes=FLOAT_INT)
fn("index_tensor", "index", lambda x, i: x[i], I("V", "F"), I("N", "T", kind="index:V"))
fn("index_two_axes", "index", lambda x, i, j: x[:, :, i, j], NCHW, I("T", kind="index:H"), I("T", kind="index:W"))
fn("scatter", "index", lambda x, i, v: torch.scatter(x, 1, i, v), NCL, I("N", 1, "L", kind="index:C"),
   I("N", 1, "L"))
fn("index_put", "index", lambda x, i, v: torch.index_put(x, (i,), v, accumulate=True), I("V", "F"), I("T", kind="index:V"),
   I("T", "F"))
fn("topk", "index", lambda x: torch.topk(x, 2, -1).values, NCL)

# -- embedding --------------------------------------------------------------------------------------
mod("embedding", "embedding", lambda d: nn.Embedding(d["V"], d["F"]), I("N", "T", kind="index:V"), dims=("F",))
mod("embedding_padding_idx", "embedding", lambda d: nn.Embedding(d["V"], d["F"], padding_idx=0),
    I("N", "T", kind="index:V"), dims=("F",))

# -- resampling and padding -------------------------------------------------------------------------
fn("upsample_nearest2d", "upsample", lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), NCHW)
fn("upsample_nearest2d_size", "upsample", lambda x: F.interpolate(x, size=(5, 9), mode="nearest"), NCHW)
fn("upsample_bilinear2d", "upsample", lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear"), NCHW)
fn("upsample_bilinear2d_align_corners", "upsample",
   lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True), NCHW)
fn("upsample_nearest1d", "upsample", lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"), NCL)
fn("pad_constant2d", "pad", lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), NCHW)
fn("pad_constant1d", "pad", lambda x: F.pad(x, (2, 1)), NCL)
fn("pad_reflect2d", "pad", lambda x: F.pad(x, (1, 1, 2, 2), mode="reflect"), NCHW)
fn("pad_replicate2d", "pad", lambda x: F.pad(x, (2, 1, 1, 2), mode="replicate"), NCHW)
fn("pad_reflect1d", "pad", lambda x: F.pad(x, (2, 2), mode="reflect"), NCL)
fn("pad_circular2d", "pad", lambda x: F.pad(x, (1, 1, 1, 1), mode="circular"), NCHW)

# -- attention --------------------------------------------------------------------------------------
QKV = I("N", "h", "T", "D")
fn("sdpa", "attention", F.scaled_dot_product_attention, QKV, QKV, QKV)
fn("sdpa_causal", "attention", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), QKV, QKV, QKV)
fn("sdpa_additive_mask", "attention", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
   QKV, QKV, QKV, I("T", "T"))
fn("sdpa_cross", "attention", F.scaled_dot_product_attention, QKV, I("N", "h", "L", "D"), I("N", "h", "L", "D"),
   fixed={"L": 9})
fn("attention_explicit", "attention",
   lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v, QKV, QKV, QKV)


class _MHA(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


mod("multihead_attention", "attention", lambda d: _MHA(d["h"] * d["D"], d["h"]), I("N", "T", lambda d: d["h"] * d["D"]))

# -- recurrent --------------------------------------------------------------------------------------


class _Recurrent(nn.Module):
    """An nn.RNN/GRU/LSTM, returning its output sequence (and final state, for ``with_state``)."""

    def __init__(self, rnn: nn.Module, with_state: bool = False):
        super().__init__()
        self.rnn, self.with_state = rnn, with_state

    def forward(self, x: torch.Tensor) -> Any:
        out, state = self.rnn(x)
        if not self.with_state:
            return out
        return (out, *state) if isinstance(state, tuple) else (out, state)


class _Cell(nn.Module):
    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> Any:
        if isinstance(self.cell, nn.LSTMCell):
            return self.cell(x, (h, torch.tanh(h)))
        return self.cell(x, h)


SEQ = I("N", "T", "C")
mod("gru", "rnn", lambda d: _Recurrent(nn.GRU(d["C"], d["G"], batch_first=True)), SEQ, dims=("G",))
mod("gru_2layer_state", "rnn", lambda d: _Recurrent(nn.GRU(d["C"], d["G"], 2, batch_first=True), True), SEQ,
    dims=("G",))
mod("lstm", "rnn", lambda d: _Recurrent(nn.LSTM(d["C"], d["G"], batch_first=True), True), SEQ, dims=("G",))
mod("lstm_bidirectional", "rnn", lambda d: _Recurrent(nn.LSTM(d["C"], d["G"], batch_first=True, bidirectional=True)),
    SEQ, dims=("G",))
mod("rnn_tanh", "rnn", lambda d: _Recurrent(nn.RNN(d["C"], d["G"], batch_first=True)), SEQ, dims=("G",))
mod("gru_cell", "rnn", lambda d: _Cell(nn.GRUCell(d["C"], d["G"])), NC, I("N", "G"))
mod("lstm_cell", "rnn", lambda d: _Cell(nn.LSTMCell(d["C"], d["G"])), NC, I("N", "G"))

# -- int8 quantize / dequantize patterns (PT2E's quantized_decomposed ops) --------------------------


def _qdq(x: torch.Tensor, scale: float, zero_point: int = 0) -> torch.Tensor:
    q = QD.quantize_per_tensor(x, scale, zero_point, -128, 127, torch.int8)
    return QD.dequantize_per_tensor(q, scale, zero_point, -128, 127, torch.int8)


def _int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights and their scales, as PT2E's quantizers make them."""
    scales = weight.detach().abs().reshape(weight.shape[0], -1).amax(1).clamp_min(1e-6) / 127.0
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.detach() / scales.reshape(shape)), -127, 127).to(torch.int8)
    return q, scales


class _QuantOp(nn.Module):
    """``dq(q(x)) -> op with dq(int8 weight) -> q -> dq``: a statically quantized conv or linear
    (with ``weight_only`` the activations stay float). The output scale is calibrated on a
    sample, so outputs use the int8 range."""

    def __init__(self, layer: nn.Module, sample: torch.Tensor, relu: bool = False, weight_only: bool = False):
        super().__init__()
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        self.padding, self.relu, self.weight_only = getattr(layer, "padding", 0), relu, weight_only
        q, scales = _int8_weight(layer.weight)
        self.register_buffer("wq", q)
        self.register_buffer("w_scales", scales)
        self.register_buffer("w_zero", torch.zeros(scales.shape, dtype=torch.int64))
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.in_scale = float(sample.abs().max()) / 127.0
        with torch.no_grad():
            self.out_scale = float(self._float(sample).abs().max()) / 127.0

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        w = QD.dequantize_per_channel(self.wq, self.w_scales, self.w_zero, 0, -127, 127, torch.int8)
        if not self.weight_only:
            x = _qdq(x, self.in_scale)
        y = F.conv2d(x, w, self.bias, padding=self.padding) if self.kind == "conv" else F.linear(x, w, self.bias)
        return torch.relu(y) if self.relu else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._float(x)
        return y if self.weight_only else _qdq(y, self.out_scale)


class _QuantAdd(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _qdq(_qdq(x, 0.03) + _qdq(y, 0.03), 0.05)


class _QuantPerChannel(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scales", torch.linspace(0.01, 0.04, channels))
        self.register_buffer("zeros", torch.arange(channels, dtype=torch.int64) - channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = QD.quantize_per_channel(x, self.scales, self.zeros, 1, -128, 127, torch.int8)
        return QD.dequantize_per_channel(q, self.scales, self.zeros, 1, -128, 127, torch.int8)


def _sample(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


INT8 = {"dtypes": FP32, "tolerance": "qdq"}
fn("quantize_dequantize", "quantized", lambda x: _qdq(x, 0.03, 3), NCHW, **INT8)
mod("quantize_dequantize_per_channel", "quantized", lambda d: _QuantPerChannel(d["C"]), NCL, **INT8)
mod("quantized_linear", "quantized", lambda d: _QuantOp(nn.Linear(d["F"], d["G"]), _sample(4, d["F"])),
    I("N", "F"), dims=("G",), **INT8)
mod("quantized_conv2d_relu", "quantized",
    lambda d: _QuantOp(nn.Conv2d(d["C"], d["G"], 3, padding=1), _sample(1, d["C"], 8, 8), relu=True), NCHW,
    dims=("G",), **INT8)
mod("quantized_add", "quantized", lambda d: _QuantAdd(), NCHW, NCHW, **INT8)
mod("weight_only_int8_linear", "quantized",
    lambda d: _QuantOp(nn.Linear(d["F"], d["G"]), _sample(4, d["F"]), weight_only=True), NTF, dims=("G",), **INT8)

# -- blocks -----------------------------------------------------------------------------------------


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class _InvertedResidual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        hidden = 4 * c
        self.body = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                                  nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU6(), nn.Conv2d(hidden, c, 1, bias=False),
                                  nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, max(1, c // 2)), nn.Linear(max(1, c // 2), c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class _SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _PreNormAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class _UNetUp(nn.Module):
    def __init__(self, c: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * c, out, 3, padding=1)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([F.interpolate(low, scale_factor=2.0), skip], 1)))


mod("conv_bn_relu", "block", lambda d: nn.Sequential(nn.Conv2d(d["C"], d["G"], 3, padding=1), nn.BatchNorm2d(d["G"]),
                                                      nn.ReLU()), NCHW, dims=("G",))
mod("residual_block", "block", lambda d: _Residual(d["C"]), NCHW)
mod("depthwise_separable", "block", lambda d: nn.Sequential(
    nn.Conv2d(d["C"], d["C"], 3, padding=1, groups=d["C"]), nn.BatchNorm2d(d["C"]), nn.ReLU6(),
    nn.Conv2d(d["C"], d["G"], 1)), NCHW, dims=("G",))
mod("inverted_residual", "block", lambda d: _InvertedResidual(d["C"]), NCHW)
mod("squeeze_excite", "block", lambda d: _SqueezeExcite(d["C"]), NCHW)
mod("mlp_gelu", "block", lambda d: nn.Sequential(nn.Linear(d["F"], 2 * d["F"]), nn.GELU(),
                                                  nn.Linear(2 * d["F"], d["F"])), NTF)
mod("swiglu", "block", lambda d: _SwiGLU(d["F"], 2 * d["F"]), NTF)
mod("prenorm_attention", "block", lambda d: _PreNormAttention(d["h"] * d["D"], d["h"]),
    I("N", "T", lambda d: d["h"] * d["D"]))
mod("transformer_encoder_layer", "block",
    lambda d: nn.TransformerEncoderLayer(d["h"] * d["D"], d["h"], 2 * d["h"] * d["D"], dropout=0.0, batch_first=True),
    I("N", "T", lambda d: d["h"] * d["D"]))
mod("unet_up", "block", lambda d: _UNetUp(d["C"], d["G"]), NCHW,
    I("N", "C", lambda d: 2 * d["H"], lambda d: 2 * d["W"]), dims=("G",))
mod("conv1d_block", "block", lambda d: nn.Sequential(nn.Conv1d(d["C"], d["G"], 3, padding=1), nn.BatchNorm1d(d["G"]),
                                                      nn.ReLU(), nn.MaxPool1d(2)), NCL, dims=("G",))


def catalogue() -> list[Case]:
    """Every single-op and block case, in a stable order (zoo models are added by :func:`zoo_cases`)."""
    names = [c.name for c in CASES]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # pragma: no cover - a catalogue bug
        raise AssertionError(f"duplicate case names: {dup}")
    return list(CASES)


def zoo_cases(zoo: Mapping[str, Any]) -> list[Case]:
    """A case per ``zoo:`` model (``handoff.zoo.ZooModel``): its own inputs, float32, fixed shapes."""
    cases = []
    for name, model in sorted(zoo.items()):
        specs = [tuple(s) for s in model.inputs]
        kinds = tuple(Input(tuple(shape), "normal" if dtype.startswith("float") else f"zoo:{dtype}")
                      for shape, dtype in specs)
        cases.append(Case(f"zoo_{name}", "zoo", lambda d, m=model: m.build(), kinds, dtypes=FP32))
    return cases
