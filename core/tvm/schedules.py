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

* :class:`Contraction`, one reduction block (conv2d, depthwise conv, matmul, pooling), with fused
  injective blocks around it, scheduled the way TOPI's old x86 conv schedules and dlight's rules
  do it: the innermost output loops are fused until they span a vector register and split into
  (outer, vector lanes); the output loops along which an operand is reused (rows reuse the
  weights, output channels the input; a depthwise conv's channels reuse nothing) are
  register-blocked, up to half the vector registers (the outermost of them takes what room the
  inner ones leave); the reduction loops go outside that tile
  (a 3x3 window unrolled), the outer output loops are fused and parallel. The tile accumulates in
  a local buffer (``cache_write``: registers once unrolled) and is written back once through the
  epilogue (bias, batch norm, ReLU/ReLU6), vectorised. Padding never reaches the vector loop as
  a bounds test: where each parallel tile reads its own part of the input (depthwise conv,
  pooling) that part is copied per tile, next to its use; otherwise (a dense conv, whose tiles
  all read the whole input) the padded input is made once, in a parallel loop nest of its own,
  and for a strided conv stored by column phase so the vector loop reads consecutive elements
  (:func:`_split_phases`). Vector width and register count come from the CPU's features
  (:func:`_vector_bits`).
* :class:`Injective`, loop nests with no reduction: fused, parallel over the outer part,
  vectorised over the inner part.

Every rule returns ``None`` for a function it does not understand, which then stays as the
pipeline leaves it (correct, only slower): a schedule rule never changes what is computed.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.sym.pattern import detect_linear_equation
from tvm.target import Target
from tvm.target.codegen import llvm_get_cpu_features, llvm_get_vector_width

#: the most a register-blocked output loop of :class:`Contraction` is unrolled by
REGISTER_ROWS = 4


def _vector_bits(target: Target) -> int:
    """The width of the target's vector registers in bits. On x86 from the CPU's features:
    TVM 0.27's ``llvm_get_vector_width`` answers 512 for every x86 CPU (haswell and znver3 too,
    which have 256-bit AVX2), and schedules made for 16 lanes and 32 registers spill on those
    (MobileNetV2's kernels 3.3x, ResNet-18's 2.5x slower on an AVX2 host). Elsewhere (AArch64:
    128) its answer."""
    if "x86" in str(target.attrs.get("mtriple", "")):
        try:
            features = set(llvm_get_cpu_features(target))
        except Exception:  # a TVM that cannot say: x86-64's baseline, SSE2
            return 128
        return 512 if "avx512f" in features else 256 if "avx" in features else 128
    width = llvm_get_vector_width(target)
    return width if width > 0 else 128


def _lanes(target: Target, bits: int) -> int:
    return max(2, _vector_bits(target) // bits)


def _dtype_bits(sch: s_tir.Schedule, block: Any) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def _static(sch: s_tir.Schedule, loop: Any) -> int | None:
    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None


def _vector_factor(extent: int, lanes: int, rows: tuple[int, ...] = ()) -> int:
    """The largest divisor of ``extent`` up to ``lanes`` (1: do not vectorise). Not only powers
    of two: MobileNet's 7x7 and 14x14 maps (49, 196) take 7 and 14 lanes, which LLVM widens to
    one register with a masked tail, instead of running scalar or at 4 lanes. With ``rows`` (the
    extents of the loops fused into ``extent`` from the innermost, each with those inside it:
    a row, a plane), only factors that tile whole rows and planes or divide them: a tile ending
    mid-row makes ``reverse_compute_at`` cover the whole last row in two parallel tiles, each
    reading the other's unfinished sums (a 5x6 matmul with a cast epilogue at 15 lanes came back
    with a wrong row; 3x3 maps of 8 channels at 12 lanes, a quarter of a max pool's outputs)."""
    for v in range(min(lanes, extent), 1, -1):
        if extent % v == 0 and all(v % row == 0 or row % v == 0 for row in rows):
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
        index = blocks.index(main)
        producers, epilogue = blocks[:index], blocks[index + 1:]
        block = main.block_rv
        extents = [_static(sch, lp) for lp in sch.get_loops(block)]
        if any(e is None for e in extents):
            return None
        lanes = _lanes(target, _dtype_bits(sch, block))
        deps = _dependencies(sch, block, nspatial)
        reuse = [any(k not in d for _, d in deps) for k in range(nspatial)]
        # The output loops fused into the vector loop (innermost, until they span a register) and
        # those fused into the parallel loop (the rest).
        ninner, span = 1, extents[nspatial - 1]
        while ninner < nspatial and span < lanes:
            ninner, span = ninner + 1, span * extents[nspatial - ninner - 1]
        tiled = {k for k in range(nspatial - ninner) if extents[k] > 1}
        # Padding: where each parallel tile reads its own part of the padded input (depthwise
        # conv, pooling) that part is copied per tile, next to its use; a dense conv's padding is
        # made once for the whole input (its tiles all read all of it). Inlined, it would put a
        # bounds test into every vector load of the reduction (ResNet-18's 3x3 convs 2-6x slower).
        # Other producers are inlined.
        staged, padded = [], []
        for b in producers:
            written = sch.get(b.block_rv).writes
            if len(producers) == 1 and written and any(buf.same_as(written[0].source) and tiled <= d
                                                       for buf, d in deps):
                staged.append(b.block_rv)
                continue
            if _pads(sch, b.block_rv):
                padded.append(b.block_rv)
                _split_phases(sch, b.block_rv, block, nspatial)
                continue
            try:
                sch.compute_inline(b.block_rv)
            except Exception:
                return None
        # The epilogue chain is inlined into its last block (it cannot go into the reduction
        # block: that would apply it to partial sums).
        for b in epilogue[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:
                return None
        # The output tile is accumulated in a local buffer (registers, once unrolled and
        # vectorised) and written back once, through the epilogue (bias, batch norm, ReLU6): the
        # partial sums never go to memory, and the activation costs no pass of its own.
        writeback = sch.cache_write(block, 0, "local")
        apart = []  # an epilogue that reads the output elsewhere than it writes (transpose): per tile
        if epilogue:
            try:
                sch.reverse_compute_inline(epilogue[-1].block_rv)
            except Exception:
                apart = [epilogue[-1].block_rv]
        loops = sch.get_loops(block)
        spatial, reduce = list(loops[:nspatial]), list(loops[nspatial:])
        inner = spatial.pop()
        for _ in range(ninner - 1):
            inner = sch.fuse(spatial.pop(), inner)
        tail = []
        # Whole rows and planes only: the write-back below goes to each tile's (see _vector_factor).
        fused = tuple(math.prod(extents[k:nspatial]) for k in range(nspatial - 1, nspatial - ninner, -1))
        lanes = _vector_factor(span, lanes, fused)
        if lanes >= 4:
            inner, inner_i = sch.split(inner, factors=[None, lanes])
            tail = [inner_i]
        # Register blocking: output loops along which an operand is reused (the weights across
        # rows, the input across output channels; a depthwise conv's channel loop reuses
        # nothing) are split, innermost first, until the tile fills half the vector registers.
        # The outermost of them takes what room is left (a 7x7 map has no row loop outside its
        # vector: its output channels alone must give the FMAs enough independent sums).
        rows = []
        room = _registers(target) // 2
        blocked = [k for k in reversed(range(len(spatial))) if reuse[k] and extents[k] > 1]
        for k in blocked:
            cap = room if k == blocked[-1] else min(REGISTER_ROWS, room)
            factor = _vector_factor(extents[k], cap)
            if factor < 2 or extents[k] == factor:
                continue
            spatial[k], row = sch.split(spatial[k], factors=[None, factor])
            rows.insert(0, row)
            room //= factor
            if room < 2:
                break
        sch.reorder(*spatial, inner, *reduce, *rows, *tail)
        outer = sch.fuse(*spatial) if len(spatial) > 1 else (spatial[0] if spatial else inner)
        sch.parallel(outer)
        for loop in rows:
            sch.unroll(loop)
        for loop, extent in zip(reduce[1:], extents[nspatial + 1:]):
            if extent <= 3:  # a 3x3 window: constant offsets
                sch.unroll(loop)
        if tail:
            sch.vectorize(tail[0])  # before the init is split off: vectorize wants a whole reduction block
        if reduce:
            sch.decompose_reduction(block, reduce[0])
        # The tile's write-back (with the epilogue) right after its reduction, vectorised alike.
        sch.reverse_compute_at(writeback, inner)
        _vectorise_innermost(sch, writeback, _depth(sch, block, inner), lanes)
        for consumer in apart:
            sch.reverse_compute_at(consumer, outer)
            _vectorise_innermost(sch, consumer, _depth(sch, block, outer), lanes)
        for producer in staged:
            sch.compute_at(producer, outer)
            _vectorise_innermost(sch, producer, _depth(sch, block, outer), lanes)
        for producer in padded:
            _parallel_vector(sch, producer, _lanes(target, _dtype_bits(sch, producer)))
        return sch


def _pads(sch: s_tir.Schedule, block: Any) -> bool:
    """Whether ``block`` pads its input: it reads one buffer and writes one of the same rank that
    is larger along some axis and smaller along none."""
    stmt = sch.get(block)
    if len(stmt.reads) != 1 or len(stmt.writes) != 1:
        return False
    src, dst = stmt.reads[0].source.shape, stmt.writes[0].source.shape
    if len(src) != len(dst) or not all(isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm) for a, b in zip(src, dst)):
        return False
    grows = [int(b) - int(a) for a, b in zip(src, dst)]
    return min(grows) >= 0 and max(grows) > 0


def _split_phases(sch: s_tir.Schedule, pad: Any, block: Any, nspatial: int) -> None:
    """Where ``block`` reads ``pad``'s output with a stride along its last axis (a strided
    convolution: input column ``ow * s + kw``), store that buffer by phase, ``[..., w % s, w // s]``,
    so that the vector loop over output columns reads consecutive elements (``[..., kw % s, ow +
    kw // s]``) instead of a stride-``s`` gather, which LLVM makes lane by lane (ResNet-18's
    stride-2 3x3 convs ran at 5-30 GMAC/s against 70-100 for stride 1). ``pad`` writes in that
    order. A width the stride does not divide keeps the plain layout."""
    written = sch.get(pad).writes[0].source
    width = written.shape[-1]
    ow = sch.get(block).iter_vars[nspatial - 1].var
    region = next((r for r in sch.get(block).reads if r.source.same_as(written)), None)
    coeff = detect_linear_equation(region.region[-1].min, [ow]) if region is not None else []
    stride = int(coeff[0]) if coeff and isinstance(coeff[0], tirx.IntImm) else 1
    if stride < 2 or not isinstance(width, tirx.IntImm) or int(width) % stride:
        return

    def phases(*i: Any) -> tuple[Any, ...]:
        return (*i[:-1], i[-1] % stride, i[-1] // stride)

    try:
        sch.transform_layout(pad, ("write", 0), tirx.IndexMap.from_func(phases, ndim=len(written.shape)))
        # the padding block's own loops in that order, so it writes each phase's row contiguously
        sch.transform_block_layout(pad, tirx.IndexMap.from_func(phases, ndim=len(sch.get(pad).iter_vars)))
    except Exception:  # a layout TVM cannot rewrite here: as it was (correct, read with a stride)
        pass


def _dependencies(sch: s_tir.Schedule, block: Any, nspatial: int) -> list[tuple[Any, set[int]]]:
    """Each buffer the block reads, with the indices of the output iterators (the first
    ``nspatial``) its region depends on. An iterator that some operand does not depend on reuses
    that operand: a register tile along it loads the operand once for the whole tile."""
    stmt = sch.get(block)
    iters = [iv.var for iv in stmt.iter_vars[:nspatial]]
    out = []
    for region in stmt.reads:
        used = [v for r in region.region for v in tirx.analysis.undefined_vars(r.min, [])]
        out.append((region.source, {k for k, iv in enumerate(iters) if any(v.same_as(iv) for v in used)}))
    return out


def _depth(sch: s_tir.Schedule, block: Any, loop: Any) -> int:
    """How many of ``block``'s loops enclose it down to ``loop`` (included)."""
    return [sch.get(lp).same_as(sch.get(loop)) for lp in sch.get_loops(block)].index(True) + 1


def _registers(target: Target) -> int:
    """Vector registers of the target: 32 with AVX-512 or on AArch64, else 16."""
    return 32 if _vector_bits(target) >= 512 or "aarch64" in str(target.attrs.get("mtriple", "")) else 16


def _vectorise_innermost(sch: s_tir.Schedule, block: Any, depth: int, lanes: int) -> None:
    """Vectorise ``block``'s innermost loop, if it is below the first ``depth`` loops, by a divisor
    of its extent up to ``lanes``."""
    loops = sch.get_loops(block)[depth:]
    if not loops or lanes < 4:
        return
    extent = _static(sch, loops[-1]) or 1
    v = _vector_factor(extent, lanes)
    if v >= 4:
        last = loops[-1]
        if v != extent:
            _, last = sch.split(last, factors=[None, v])
        sch.vectorize(last)


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
