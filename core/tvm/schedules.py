"""Default CPU schedules for untuned TVM builds: what ``tvm`` compiles with when nothing is tuned.

TVM 0.27's Relax pipeline for LLVM targets (``relax.get_default_pipeline``: legalize, fuse,
lower) schedules nothing: every operator becomes the naive loop nest its TOPI compute describes,
one thread, no vector instructions (MobileNetV2: 8.7x eager torch on this host). TVM 0.27 has no
TOPI schedules for x86 or Arm any more (``tvm.topi`` keeps computes only); its CPU schedules are
the dlight rules ``tvm.s_tir.dlight.cpu.GEMV`` and ``Reduction`` (softmax, norms). The two rules
here, written with the same dlight machinery, take convolutions, matmuls, pooling and elementwise
work; :func:`default_schedule` tries :class:`Contraction` before dlight's rules (whose Reduction
would take a convolution with a fused epilogue as a scalar row reduction) and :class:`Injective`
after them:

* :class:`Contraction`, one reduction block (conv2d, matmul, pooling), with fused injective
  blocks around it: the innermost output loops are fused until they span a vector register and
  split into (outer, vector lanes), the next output loop is register-blocked by 4, the reduction
  loops go between, the outer output loops are fused and parallel, the init is split off the
  reduction, and the epilogue (bias, ReLU, clip) is computed in the same parallel loop.
* :class:`Injective`, loop nests with no reduction: fused, parallel over the outer part,
  vectorised over the inner part.

Every rule returns ``None`` for a function it does not understand, which then stays as the
pipeline leaves it (correct, only slower): a schedule rule never changes what is computed.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

#: rows of the output tile kept in registers by :class:`Contraction`
REGISTER_ROWS = 4


def _lanes(target: Target, bits: int) -> int:
    width = llvm_get_vector_width(target)
    return max(2, (width if width > 0 else 128) // bits)


def _dtype_bits(sch: s_tir.Schedule, block: Any) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def _static(sch: s_tir.Schedule, loop: Any) -> int | None:
    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None


def _vector_factor(extent: int, lanes: int, row: int | None = None) -> int:
    """The largest divisor of ``extent`` up to ``lanes`` (1: do not vectorise). Not only powers
    of two: MobileNet's 7x7 and 14x14 maps (49, 196) take 7 and 14 lanes, which LLVM widens to
    one register with a masked tail, instead of running scalar or at 4 lanes. With ``row`` (the
    extent of the innermost loop fused into ``extent``), only factors that tile whole rows or
    divide a row: a tile ending mid-row makes ``reverse_compute_at`` cover the whole last row in
    two parallel tiles, each reading the other's unfinished sums (a 5x6 matmul with a cast
    epilogue at 15 lanes came back with a wrong row)."""
    for v in range(min(lanes, extent), 1, -1):
        if extent % v == 0 and (row is None or v % row == 0 or row % v == 0):
            return v
    return 1


class _CPURule(dl.ScheduleRule):
    """A rule for LLVM targets whose schedule primitives may refuse a function: then ``None``."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self.schedule(s_tir.Schedule(func), target)
        except Exception:  # tvm.error.TVMError and friends: leave the function unscheduled
            return None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class Injective(_CPURule):
    """Elementwise, broadcast, transpose, reshape, padding: parallel outer, vectorised inner."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> s_tir.Schedule | None:
        blocks = normalize_prim_func(sch)
        if not blocks or any(not b.is_injective() for b in blocks):
            return None
        # Inline producers into the last block where TVM allows it (fewer passes over memory).
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # not inlinable (e.g. read by two consumers): its own loop nest
                pass
        for b in normalize_prim_func(sch) or []:
            _parallel_vector(sch, b.block_rv, _lanes(target, _dtype_bits(sch, b.block_rv)))
        return sch


def _parallel_vector(sch: s_tir.Schedule, block: Any, lanes: int) -> None:
    """Vectorise the innermost loops (fused until they span a register) by a divisor of their
    extent, so that the lanes never cross a row: each vector is one contiguous load and the
    per-channel operands (bias, scale) stay scalars; the loops outside are fused and parallel."""
    loops = list(sch.get_loops(block))
    if not loops or any(_static(sch, lp) is None for lp in loops):
        return
    inner = loops.pop()
    while loops and _static(sch, inner) < lanes:
        inner = sch.fuse(loops.pop(), inner)
    v = _vector_factor(_static(sch, inner), lanes)
    if v < 4:
        fused = sch.fuse(*loops, inner) if loops else inner
        if (_static(sch, fused) or 0) >= 2:
            sch.parallel(fused)
        return
    outer, vec = sch.split(inner, factors=[None, v])
    fused = sch.fuse(*loops, outer) if loops else outer
    sch.parallel(fused)
    sch.vectorize(vec)


class Contraction(_CPURule):
    """One reduction block (conv2d, depthwise conv, matmul, pooling) with injective blocks
    around it (padding before, bias/activation after): see the module docstring."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> s_tir.Schedule | None:
        blocks = normalize_prim_func(sch)
        if not blocks:
            return None
        reductions = [b for b in blocks if not b.is_injective()]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        kinds = main.dom_kind()
        nspatial = len(kinds) - len(kinds.lstrip("S"))
        if not nspatial or kinds[nspatial:].strip("R") or nspatial == len(kinds):
            return None  # not S...SR...R
        # Producers (padding) inlined into the reduction; consumers (epilogue) after it.
        index = blocks.index(main)
        for b in blocks[:index]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:
                return None
        # The epilogue chain is inlined into its last block, which is computed per parallel tile
        # (it cannot go into the reduction block: that would apply it to partial sums).
        epilogue = blocks[index + 1:]
        for b in epilogue[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:
                return None
        epilogue = epilogue[-1:]
        block = main.block_rv
        loops = sch.get_loops(block)
        spatial, reduce = list(loops[:nspatial]), list(loops[nspatial:])
        extents = [_static(sch, lp) for lp in loops]
        if any(e is None for e in extents):
            return None
        lanes = _lanes(target, _dtype_bits(sch, block))
        # Fuse inner output loops until they span at least a vector register.
        inner = spatial.pop()
        row = _static(sch, inner)
        while spatial and _static(sch, inner) < lanes:
            inner = sch.fuse(spatial.pop(), inner)
        tail = []
        lanes = _vector_factor(_static(sch, inner), lanes, row if epilogue else None)
        if lanes >= 4:
            inner, inner_i = sch.split(inner, factors=[None, lanes])
            tail = [inner_i]
        rows = []
        if spatial and _static(sch, spatial[-1]) % REGISTER_ROWS == 0 and _static(sch, spatial[-1]) > REGISTER_ROWS:
            row_o, row_i = sch.split(spatial.pop(), factors=[None, REGISTER_ROWS])
            spatial.append(row_o)
            rows = [row_i]
        sch.reorder(*spatial, inner, *reduce, *rows, *tail)
        outer = sch.fuse(*spatial) if len(spatial) > 1 else (spatial[0] if spatial else None)
        parallel = outer if outer is not None else inner
        sch.parallel(parallel)
        for loop in rows:
            sch.unroll(loop)
        if tail:
            sch.vectorize(tail[0])  # before the init is split off: vectorize wants a whole reduction block
        if reduce:
            sch.decompose_reduction(block, reduce[0])
        for b in epilogue:
            sch.reverse_compute_at(b.block_rv, parallel)
            loops = sch.get_loops(b.block_rv)[1:]
            if loops:
                fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                v = _vector_factor(_static(sch, fused) or 1, lanes)
                if v >= 4:
                    _, vec = sch.split(fused, factors=[None, v])
                    sch.vectorize(vec)
        return sch


class _Guarded(dl.ScheduleRule):
    """Another rule, with its failures (a primitive refusing a function) turned into ``None``."""

    def __init__(self, rule: dl.ScheduleRule) -> None:
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> Any:
        try:
            return self.rule.apply(func, target, tunable)
        except Exception:
            return None


def dlight_rules() -> list[dl.ScheduleRule]:
    """TVM's own CPU rules (``tvm.s_tir.dlight.cpu``), guarded."""
    return [_Guarded(dl.cpu.GEMV()), _Guarded(dl.cpu.Reduction())]


def default_schedule(rules: str = "default") -> Any:
    """The module pass that schedules every PrimFunc no rule has scheduled yet (tuned ones keep
    their tuned schedule): dlight's CPU GEMV and Reduction rules, then (``rules="default"``)
    :class:`Contraction` and :class:`Injective`; ``rules="dlight"``: dlight's only."""
    if rules != "default":
        return dl.ApplyDefaultSchedule(*dlight_rules())
    # Contraction first: dlight's Reduction also claims a convolution with a fused epilogue (batch
    # norm folded into it) and schedules it as a row reduction, scalar and 10x slower; Contraction
    # declines what has more than one reduction (softmax, norms), which Reduction then gets.
    return dl.ApplyDefaultSchedule(Contraction(), *dlight_rules(), Injective())
