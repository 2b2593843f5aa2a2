"""A backend's capability table checked against its real compiler, one op at a time (the shared
half of the plugins' ``tools/check_op_table.py``; public through :mod:`handoff.testing`).

A plugin's tool lists its samples (:class:`Samples`: a one-op function or module and its inputs,
one or more per op, plus the constraint cases its table declines) and calls :func:`check_op_table`
with its backend, how to lower a node whatever the table says, and how to evaluate the blob. For
every sample, the one-op module is exported and decomposed as ``handoff partition`` does (with
the ops the backend keeps whole, and ``keep``), the compiler's ``support`` is asked whether it
claims the op's node, and the node is lowered for real and, where the evaluator can, run and
compared with eager torch (1e-12 relative for float64, 1e-2 where the backend or an input computes
in float16, else 1e-4; exact for integers and bools; a float16 result may instead match eager
torch run in float16; a quantized sample, :meth:`Samples.add_quantized`, within one quantization
step of its output, 64 for a 16-bit output). A claim must lower (and match, where evaluable); a
decline must fail one of the two; a decline the plugin documents as a device-only bug
(``documented``) counts neither way. Anything else is a mismatch: exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import operator
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)

from .partitioner import op_name
from .tempfiles import temp_dir

A = torch.ops.aten
#: Nodes a one-op sample may hold besides its op.
AUX = frozenset({operator.getitem, A._assert_tensor_metadata.default})
_QD = torch.ops.quantized_decomposed
#: The quantize/dequantize ops of a quantized sample (:meth:`Samples.add_quantized`).
QDQ_OPS = (_QD.quantize_per_tensor.default, _QD.dequantize_per_tensor.default, _QD.quantize_per_channel.default,
           _QD.dequantize_per_channel.default)
#: A 16-bit sample's tolerance in its own steps: a quarter of an 8-bit step over the same range.
#: Integer 16-bit kernels requantize with less internal precision than float compute (QNN HTP,
#: measured: linear 24 steps, add 1), while a wrong encoding (zero point, scale, an 8-bit
#: requantization: up to 128) is off by more.
SIXTEEN_BIT_STEPS = 64.0
#: Activation encodings of a quantized sample: torch dtype, quant_min, quant_max.
ACTIVATIONS = {"int8": (torch.int8, -128, 127), "uint16": (torch.uint16, 0, 65535)}


@dataclasses.dataclass
class Sample:
    op: Any
    label: str
    fn: Callable[..., Any]
    inputs: tuple[Any, ...]
    module: torch.nn.Module | None = None
    allow: tuple[Any, ...] = ()  # other ops the sample needs (a neighbour for an op that is a no-op alone)
    step: float | None = None  # a quantized sample: its output's quantization step, the tolerance's unit
    steps: float = 1.0  # the tolerance in those steps

    def eager(self) -> torch.nn.Module:
        return self.module if self.module is not None else _Fn(self.fn)


class NotEvaluable(Exception):
    """Raised by an evaluator that cannot run a blob here (the message says why): the sample then
    counts as lowered, its numerics unchecked."""


class Samples(list):
    """The samples of a tool, with seeded input makers: ``r`` (float, ``lo``: positive from
    ``lo``), ``ri`` (integers in [-hi, hi)), ``rb`` (booleans), and ``add`` (one sample)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)

    def r(self, *shape: int, dtype: torch.dtype = torch.float32, lo: float | None = None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen)
        if lo is not None:
            t = t.abs() + lo
        return t.to(dtype)

    def ri(self, *shape: int, hi: int = 9, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.randint(-hi, hi, shape, generator=self.gen).to(dtype)

    def rb(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen) > 0.5

    def add(self, op: Any, label: str, fn: Callable[..., Any], *inputs: Any, module: torch.nn.Module | None = None,
            allow: tuple[Any, ...] = ()) -> None:
        self.append(Sample(op, label, fn, inputs, module, allow))

    def add_quantized(self, op: Any, label: str, fn: Callable[..., Any], *inputs: torch.Tensor,
                      weight: tuple[int, ...] | None = None, allow: tuple[Any, ...] = (), activations: str = "int8",
                      per_channel: int | None = None) -> None:
        """A one-op quantized sample as PT2E leaves one: each float input quantized and dequantized
        (affine over its range), ``fn``, its result quantized and dequantized (``dq -> op -> q``).
        ``activations``: their encoding, ``"int8"`` or ``"uint16"`` (16-bit activations, e.g.
        HTP's 16a8w). ``per_channel``: an axis along which the inputs are quantized per channel
        (per-channel activations; the result stays per tensor). ``weight``: the shape of an int8
        weight, dequantized per output channel (symmetric, [-127, 127]) and passed to ``fn`` after
        the inputs. Checked within one quantization step of the output (8-bit), or
        :data:`SIXTEEN_BIT_STEPS` (16-bit); ``allow`` as for :meth:`add`."""
        w = None if weight is None else torch.randint(-127, 128, weight, generator=self.gen, dtype=torch.int8)
        module = _Quantized(fn, inputs, w, self.r(weight[0], lo=0.002) * 0.01 if weight else None,
                            ACTIVATIONS[activations], per_channel)
        self.append(Sample(op, label, fn, inputs, module, (*QDQ_OPS, *allow), module.step,
                           SIXTEEN_BIT_STEPS if activations == "uint16" else 1.0))


def int8_samples(seed: int = 0, keep: Iterable[Any] = ()) -> Samples:
    """The common int8 ops as one-op quantized samples (:meth:`Samples.add_quantized`): conv2d,
    linear, add, relu; linear (int8 weights) and add with 16-bit (uint16) activations; add with
    activations quantized per channel. A plugin's tool adds them to its own samples so its int8 claims are checked
    op by op, like its float ones. ``keep``: the ops its check keeps whole (``aten.linear``: the
    linear sample is that op, else the ``aten.mm`` it decomposes to)."""
    samples = Samples(seed)
    linear = A.linear.default if A.linear.default in set(keep) else A.mm.default
    samples.add_quantized(A.convolution.default, "int8 conv2d 3x3",
                          lambda x, w: torch.nn.functional.conv2d(x, w, padding=1), samples.r(1, 4, 8, 8),
                          weight=(6, 4, 3, 3))
    samples.add_quantized(linear, "int8 linear", torch.nn.functional.linear, samples.r(2, 16),
                          weight=(8, 16), allow=(A.permute.default,))
    samples.add_quantized(A.add.Tensor, "int8 add", torch.add, samples.r(2, 8), samples.r(2, 8))
    samples.add_quantized(A.relu.default, "int8 relu", torch.relu, samples.r(2, 8))
    samples.add_quantized(linear, "16a8w linear", torch.nn.functional.linear, samples.r(2, 16),
                          weight=(8, 16), allow=(A.permute.default,), activations="uint16")
    samples.add_quantized(A.add.Tensor, "16-bit add", torch.add, samples.r(2, 8), samples.r(2, 8),
                          activations="uint16")
    samples.add_quantized(A.add.Tensor, "int8 add, per-channel activations", torch.add, samples.r(2, 8, 4),
                          samples.r(2, 8, 4), per_channel=1)
    return samples


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def _affine(t: torch.Tensor, qmin: int, qmax: int, axis: int | None = None) -> tuple[Any, Any]:
    """Affine scale and zero point onto ``[qmin, qmax]`` covering ``t``'s range (and 0), as a
    min-max observer: floats, or along ``axis`` float32 / int64 tensors (one per channel)."""
    if axis is None:
        lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
        scale = max((hi - lo) / (qmax - qmin), 1e-6)
        return scale, int(max(qmin, min(qmax, round(qmin - lo / scale))))
    rest = [d for d in range(t.dim()) if d != axis % t.dim()]
    lo, hi = t.amin(dim=rest).clamp(max=0.0), t.amax(dim=rest).clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-6)
    return scale.float(), (qmin - lo / scale).round().clamp(qmin, qmax).to(torch.int64)


class _Quantized(torch.nn.Module):
    """``fn`` between dequantize and quantize ops (see :meth:`Samples.add_quantized`); the scales
    come from the sample inputs and the float result, as calibration on them would set them."""

    def __init__(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], weight: torch.Tensor | None,
                 scales: torch.Tensor | None, encoding: tuple[torch.dtype, int, int], axis: int | None) -> None:
        super().__init__()
        self.fn, self.encoding, self.axis = fn, encoding, axis
        self.qin = [_affine(x, *encoding[1:], axis) for x in inputs]
        for i, (s, z) in enumerate(self.qin if axis is not None else ()):  # per channel: buffers, not constants
            self.register_buffer(f"in{i}_scales", s)
            self.register_buffer(f"in{i}_zeros", z)
        if weight is not None:
            self.register_buffer("weight", weight)
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", torch.zeros(weight.shape[0], dtype=torch.int64))
        self.qout = (1.0, 0)
        with torch.no_grad():
            self.qout = _affine(self._compute(*inputs), *encoding[1:])
        self.step = self.qout[0]

    def _compute(self, *xs: torch.Tensor) -> torch.Tensor:
        qd, (dtype, qmin, qmax) = torch.ops.quantized_decomposed, self.encoding
        if self.axis is None:
            args = [qd.dequantize_per_tensor(qd.quantize_per_tensor(x, s, z, qmin, qmax, dtype), s, z, qmin, qmax, dtype)
                    for x, (s, z) in zip(xs, self.qin)]
        else:
            args = []
            for i, x in enumerate(xs):
                s, z = getattr(self, f"in{i}_scales"), getattr(self, f"in{i}_zeros")
                q = qd.quantize_per_channel(x, s, z, self.axis, qmin, qmax, dtype)
                args.append(qd.dequantize_per_channel(q, s, z, self.axis, qmin, qmax, dtype))
        if hasattr(self, "weight"):
            args.append(qd.dequantize_per_channel(self.weight, self.scales, self.zeros, 0, -127, 127, torch.int8))
        return self.fn(*args)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        qd, (s, z), (dtype, qmin, qmax) = torch.ops.quantized_decomposed, self.qout, self.encoding
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(self._compute(*xs), s, z, qmin, qmax, dtype),
                                        s, z, qmin, qmax, dtype)


def _exported(sample: Sample, keep: Iterable[Any]) -> torch.export.ExportedProgram:
    table = torch.export.default_decompositions()
    for op in keep:
        table.pop(op, None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(sample.eager().eval(), sample.inputs, strict=False).run_decompositions(table)


def _tensors(values: Any) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]


def mismatch(got: Sequence[np.ndarray], want: Any, tol: float, step: float | None = None,
             steps: float = 1.0) -> str | None:
    """Why the outputs ``got`` differ from eager ``want`` (tensors), or ``None``: same count, dtypes
    and shapes; integers and bools exact; floats within ``tol`` relative (plus ``tol`` of the
    largest finite magnitude), NaN where eager has NaN; or, with ``step`` (a quantized output),
    within ``steps`` quantization steps."""
    want = _tensors(want)
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
        gg, ww = g.astype(np.float64), w.astype(np.float64)
        if step is not None:
            off = float(np.abs(gg - ww).max(initial=0.0)) / step
            if not off <= steps * 1.001:  # NaN fails too
                return f"{off:.2f} quantization steps from eager (tolerance {steps:g})"
            continue
        scale = float(np.abs(w[np.isfinite(w)]).max(initial=0.0)) or 1.0
        if not np.allclose(gg, ww, rtol=tol, atol=tol * scale, equal_nan=True):
            err = float(np.nanmax(np.abs(gg - ww))) / scale
            return f"max error {err:.1e} of the largest magnitude (tolerance {tol:g})"
    return None


def _eager_in_float16(module: torch.nn.Module, inputs: tuple[Any, ...], like: Any) -> Any:
    """Eager torch computing in float16 (float32 inputs and weights rounded to float16), as a
    float16 backend computes, with the dtypes of ``like`` (the float32 outputs); ``None`` where
    torch has no float16 kernel."""

    def half(x: Any) -> Any:
        return x.half() if isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x

    try:
        with torch.no_grad():
            out = copy.deepcopy(module).half()(*[half(x) for x in inputs])
    except (RuntimeError, NotImplementedError):
        return None
    return [t.to(w.dtype) for t, w in zip(_tensors(out), _tensors(like))]


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def check_sample(sample: Sample, compiler: Any, lower: Callable[[Any, str], Any],
                 evaluate: Callable[[Any, list[np.ndarray]], list[np.ndarray]], *, fp16: bool = False,
                 keep: Iterable[Any] = (), documented: Callable[[Any, str | None], bool] | None = None,
                 verb: str = "compile", neighbours: bool = True) -> dict[str, Any]:
    """One row of the check: ``op``, ``sample``, ``claimed``, ``reason``, ``works``, ``evaluated``,
    ``detail`` and the ``verdict`` (``agree``, ``agree (lowering only)``, ``documented ...``,
    ``MISMATCH: ...`` or ``bad sample``). ``documented(node, reason)`` marks declines of
    device-only bugs that no lowering shows. With ``neighbours``, a decline of any other node of
    the sample (an ``allow`` op) counts as declining the sample too; a quantized sample's
    quantize/dequantize ops count always."""
    ep = _exported(sample, (*compiler.ops_to_not_decompose(), *keep))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    mine = [n for n in nodes if n.target == sample.op]
    others = sorted({op_name(n.target) for n in nodes
                     if n.target != sample.op and n.target not in AUX and n.target not in sample.allow})
    row: dict[str, Any] = {"op": op_name(sample.op), "sample": sample.label}
    if not mine or others:
        row.update(verdict="bad sample", detail=f"graph has {row['op']} x{len(mine)} and {others}")
        return row
    reasons = compiler.support(ep)
    declined = [reasons.get(n.name) for n in mine if reasons.get(n.name)]
    # a quantized sample's quantize/dequantize ops travel with its op (the core's fused spans), so
    # their declines count even without ``neighbours``
    declined += [reasons[n.name] for n in nodes if reasons.get(n.name) and n not in mine
                 and (neighbours or (sample.step is not None and n.target in QDQ_OPS))]
    row.update(claimed=not declined, reason=declined[0] if declined else None)
    fp16 = fp16 or any(isinstance(v, torch.Tensor) and v.dtype == torch.float16 for v in sample.inputs)
    tol = 1e-12 if any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in sample.inputs) else (
        1e-2 if fp16 else 1e-4)
    try:
        lowered = lower(ep, sample.label)
    except Exception as exc:
        row.update(works=False, detail=f"{verb}: {_short(exc)}")
    else:
        try:
            got = evaluate(lowered, [t.numpy() for t in sample.inputs])
        except NotEvaluable as exc:
            row.update(works=True, evaluated=False, detail=f"{verb}s; numerics not checkable here ({exc})")
        except Exception as exc:
            row.update(works=False, detail=f"run: {_short(exc)}")
        else:
            module = sample.eager()
            with torch.no_grad():
                want = module(*sample.inputs)
            wrong = mismatch(got, want, tol, sample.step, sample.steps)
            if wrong and fp16:  # rounding ops (floor, trunc) and steep ones (tan) amplify float16 rounding
                half = _eager_in_float16(module, sample.inputs, want)
                if half is not None and mismatch(got, half, tol) is None:
                    wrong = None
            row.update(works=wrong is None, evaluated=True,
                       detail=f"numerics: {wrong}" if wrong else f"{verb}s and matches eager")
    if documented is not None and not row["claimed"] and any(documented(n, reasons.get(n.name)) for n in mine):
        row["verdict"] = "documented (device-only bug, declined)"
    elif row["claimed"] == row["works"]:
        row["verdict"] = "agree" if row.get("evaluated") or not row["works"] else "agree (lowering only)"
    else:
        row["verdict"] = ("MISMATCH: claimed, but it fails" if row["claimed"]
                          else f"MISMATCH: declined, but it {verb}s" + (" and matches" if row.get("evaluated") else ""))
    return row


def check_op_table(backend: str, samples: Sequence[Sample], argv: Sequence[str] | None = None, **kw: Any) -> int:
    """The command line of a plugin's ``tools/check_op_table.py``: ``--option NAME=VALUE`` (compile
    options of ``backend``, over ``defaults``), ``-k TEXT`` (a subset), ``--json FILE``,
    ``--verbose``. Builds the compiler from the plugin module ``plugin`` (default
    ``handoff_BACKEND.plugin``; nothing autoloaded), lowers with its method ``lower`` (e.g. one that
    skips its capability check), evaluates with ``evaluate(compiler)`` (default: the backend's
    runtime half: ``load``, ``execute``, ``release``), checks every sample (:func:`check_sample`;
    ``kw`` goes there) and prints the mismatches and a summary. ``table``: the ops the capability
    table lists; one without a sample fails the run. Returns the exit status."""
    with _private_home(backend):
        return _check_op_table(backend, samples, argv, **kw)


@contextlib.contextmanager
def _private_home(backend: str) -> Iterator[None]:
    """``$HANDOFF_HOME`` for one check alone, removed with everything in it afterwards (the check
    records files and blobs it lowers), unless the caller set one."""
    if os.environ.get("HANDOFF_HOME"):
        yield
        return
    with temp_dir(f"{backend}-check") as home:
        os.environ["HANDOFF_HOME"] = str(home)
        try:
            yield
        finally:
            os.environ.pop("HANDOFF_HOME", None)


def _check_op_table(backend: str, samples: Sequence[Sample], argv: Sequence[str] | None = None, *,
                    description: str = "", lower: str = "preprocess",
                    evaluate: Callable[[Any], Callable[[Any, list[np.ndarray]], list[np.ndarray]]] | None = None,
                    table: Iterable[Any] = (), defaults: dict[str, str] | None = None, plugin: str | None = None,
                    **kw: Any) -> int:
    from .plugins import Plugins

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help=f"{backend} compile option")
    parser.add_argument("-k", default="", help="only samples whose op or label contains this text")
    parser.add_argument("--json", metavar="FILE", help="write every row as JSON")
    parser.add_argument("--verbose", action="store_true", help="print agreeing rows too")
    args = parser.parse_args(argv)
    options = {**(defaults or {}), **dict(o.split("=", 1) for o in args.option)}
    pm = Plugins(autoload=False, extra=[plugin or f"handoff_{backend}.plugin"])
    compiler = pm.compiler(backend, options)
    if evaluate is None:
        runtime, runtime_options = pm.runtime(backend), pm.parse_options(backend, {}, runtime=True)
        ok, why = runtime.is_available()
        if not ok:
            print(f"cannot run {backend} here: {why}")
            return 2

        def run(lowered: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
            handle = runtime.load(memoryview(lowered.blob), lowered.metadata, runtime_options)
            try:
                outs = list(runtime.execute(handle, inputs))
                if not all(isinstance(o, np.ndarray) for o in outs):  # device values (tvm's tensors)
                    outs = runtime.to_host(outs)
                return [np.array(o) for o in outs]
            finally:
                runtime.release(handle)
    else:
        run = evaluate(compiler)
    fp16 = compiler.options.get("precision") == "fp16"
    rows = []
    start = time.perf_counter()
    for sample in samples:
        if args.k and args.k not in sample.label and args.k not in op_name(sample.op):
            continue
        try:
            row = check_sample(sample, compiler, getattr(compiler, lower), run, fp16=fp16, **kw)
        except Exception as exc:  # a crash of the capability check itself is a finding, not the end of the run
            row = {"op": op_name(sample.op), "sample": sample.label, "verdict": "ERROR: the check crashed",
                   "detail": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        if args.verbose or not row["verdict"].startswith("agree"):
            claim = "claimed" if row.get("claimed") else f"declined ({row.get('reason')})" if "claimed" in row else ""
            print(f"{row['verdict']:<44} {row['op']:<48} {row['sample']:<44} {claim} -> {row.get('detail', '')}")
    counts = {v: sum(r["verdict"] == v for r in rows)
              for v in ("agree", "agree (lowering only)", "documented (device-only bug, declined)")}
    bad = [r for r in rows if not r["verdict"].startswith(("agree", "documented"))]
    covered = {s.op for s in samples}
    missing = [op_name(op) for op in table if op not in covered]
    print(f"\n{len(rows)} samples over {len({r['op'] for r in rows})} ops, options {options}: "
          f"{counts['agree']} agree (lowered and, where claimed, numerically checked), "
          f"{counts['agree (lowering only)']} agree (claimed and lowered; numerics not checkable here), "
          f"{counts['documented (device-only bug, declined)']} documented device-only declines, "
          f"{len(bad)} mismatch(es); {sum(bool(r.get('claimed')) for r in rows)} claimed; "
          f"{time.perf_counter() - start:.0f} s")
    if missing and not args.k:
        print(f"table entries without a sample: {', '.join(missing)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": options, "rows": rows}, indent=1, default=str))
    return 1 if bad or (missing and not args.k) else 0
