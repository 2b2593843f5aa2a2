"""handoff --backends xnnpack vs ExecuTorch's own XNNPACK program, eager torch and ONNX Runtime CPU.

    python benchmarks/xnnpack_vs_executorch.py [--runs 50] [--models zoo:mobilenet_v2,zoo:small_transformer]
                                               [--loads 10] [--phases N]

One process, one run, same inputs for everyone. For each model it prints the median latency
(after warm-up), load + first inference (median of fresh loads from the file) in wall time and in
CPU time, and program size, each as a ratio to ExecuTorch. The CPU time of a load is the whole
process's (every thread, ExecuTorch's thread pool included: ``handoff.bench.time_calls_cpu``): on
a shared machine a sub-millisecond load's wall time is mostly waiting for a time slice (the pool's
worker sleeps, then waits to be scheduled), which CPU time leaves out, so its ratio is the one that
says how much work handoff adds. A row under handoff's loads the ExecuTorch program inside its
XNNPACK blob with ExecuTorch alone: the floor under handoff's load time, which the difference to
handoff's row is handoff's own work on top of. Contenders are timed in interleaved rounds (see
``_timing.interleaved_median_ms``, ``interleaved_medians_ms`` for the loads), so drift of a shared
machine does not favour one of them. Targets: median <= 1.05x, size <= 1.10x (issue 3), load+first
<= 1.10x (issue 15).

``--phases N`` adds, per model, where handoff's load + first inference + close goes: N more loads
with each phase wrapped (``_Phases``), the median main-thread CPU time of each, exclusive of the
phases inside it (so ExecuTorch's own calls are apart from handoff's Python around them), and the
wall time from ExecuTorch's ``load_method`` returning to the first ``forward`` starting: past a few
hundred microseconds the thread pool's worker has gone to sleep and the first forward waits for it.
Not a test; numbers only.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _timing import interleaved_median_ms, interleaved_medians_ms  # benchmarks/, next to this script


class _Phases:
    """Main-thread CPU time of named phases (functions wrapped in place), each exclusive of the
    phases that run inside it, summed per load."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [name, thread CPU ns at entry, ns spent in inner phases]
        self.load: dict[str, int] = {}
        self.marks: dict[str, int] = {}  # perf_counter_ns of events this load
        self._undo: list[tuple[Any, str, Any]] = []

    def call(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        frame = [name, time.thread_time_ns(), 0]
        self.stack.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            self.stack.pop()
            spent = time.thread_time_ns() - frame[1]
            self.load[name] = self.load.get(name, 0) + spent - frame[2]
            if self.stack:
                self.stack[-1][2] += spent

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        raw = inspect.getattr_static(owner, attr)
        fn = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, fn, *args, **kwargs)

        setattr(owner, attr, staticmethod(timed) if isinstance(raw, (classmethod, staticmethod)) else timed)
        self._undo.append((owner, attr, raw))

    def unwrap(self) -> None:
        while self._undo:
            owner, attr, raw = self._undo.pop()
            setattr(owner, attr, raw)


class _ETBinding:
    """ExecuTorch's binding with ``load_program``, ``load_method`` and ``forward`` timed as phases."""

    def __init__(self, real: Any, phases: _Phases) -> None:
        self._real, self._phases = real, phases

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _load_program_from_buffer(self, *args: Any, **kwargs: Any) -> Any:
        return _ETProgram(self._phases.call("ExecuTorch load_program", self._real._load_program_from_buffer,
                                            *args, **kwargs), self._phases)


class _ETProgram:
    def __init__(self, real: Any, phases: _Phases) -> None:
        self._real, self._phases = real, phases

    def load_method(self, name: str) -> Any:
        method = self._phases.call("ExecuTorch load_method", self._real.load_method, name)
        self._phases.marks["loaded"] = time.perf_counter_ns()
        return _ETMethod(method, self._phases)


class _ETMethod:
    def __init__(self, real: Any, phases: _Phases) -> None:
        self._real, self._phases = real, phases

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __call__(self, *args: Any) -> Any:
        self._phases.marks.setdefault("forward", time.perf_counter_ns())
        return self._phases.call("ExecuTorch forward", self._real, *args)


def phase_table(hof: Path, np_inputs: list[np.ndarray], loads: int) -> list[tuple[str, float]]:
    """Median main-thread CPU microseconds per phase of ``loads`` loads + first run + close of
    ``hof`` (exclusive of inner phases; "rest" is what no phase covers), then the median wall
    microseconds from ExecuTorch's load_method to the first forward."""
    import handoff
    import handoff.runtime as hr
    from handoff.program import ProgramFile
    from handoff_xnnpack.runtime import XnnpackRuntime

    def once() -> None:
        program = handoff.load(hof)
        program.run(np_inputs)
        program.close()

    once()  # the file recorded, the plan made, the runtime started
    runtime = handoff.get_plugins().runtime("xnnpack")
    real = runtime._get_binding()
    ph = _Phases()
    for owner, attr, name in [
        (ProgramFile, "open", "ProgramFile.open"),
        (hr.Program, "__init__", "Program.__init__ (rest)"),
        (hr.Program, "_load_delegates", "Program._load_delegates (rest)"),
        (hr.Program, "_load_again", "Program._load_again (rest)"),
        (hr.probe, "vouch", "probe.vouch"),
        (XnnpackRuntime, "load", "XnnpackRuntime.load (rest)"),
        (hr.Program, "_plan", "Program._plan"),
        (ProgramFile, "remember_verified", "ProgramFile.remember_verified"),
        (hr.Program, "run", "Program.run (rest)"),
        (XnnpackRuntime, "execute", "XnnpackRuntime.execute (rest)"),
        (hr.Program, "close", "Program.close (rest)"),
        (XnnpackRuntime, "release", "XnnpackRuntime.release (ExecuTorch's free included)"),
        (ProgramFile, "close", "ProgramFile.close"),
    ]:
        ph.wrap(owner, attr, name)
    runtime._binding = _ETBinding(real, ph)
    samples: dict[str, list[int]] = {}
    gaps = []
    try:
        for _ in range(loads):
            ph.load, ph.marks = {}, {}
            ph.call("total: load + first run + close (rest)", once)
            total = sum(ph.load.values())
            for name, ns in [*ph.load.items(), ("= total", total)]:
                samples.setdefault(name, []).append(ns)
            gaps.append(ph.marks["forward"] - ph.marks["loaded"])
    finally:
        runtime._binding = real
        ph.unwrap()
    rows = [(name, statistics.median(ns) / 1e3) for name, ns in samples.items()]
    return [*rows, ("wall from load_method's return to the first forward", statistics.median(gaps) / 1e3)]


def bench_model(spec: str, runs: int, loads: int, work: Path,
                phases: int = 0) -> list[tuple[str, float, float, float, int, float]]:
    import onnxruntime as ort
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings import portable_lib as et

    import handoff
    from handoff.zoo import random_inputs

    zoo = handoff.get_plugins().zoo()[spec.removeprefix("zoo:")]
    model = zoo.build()
    inputs = random_inputs(zoo.inputs, seed=7)
    np_inputs = [t.numpy() for t in inputs]
    with torch.no_grad():
        want = model(*inputs).numpy()

    def err(got: np.ndarray) -> float:
        return float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))

    # ExecuTorch's own program, the reference every ratio is taken against.
    ep = torch.export.export(model, tuple(inputs))
    pte = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    pte_path = work / f"{spec[4:]}.pte"
    pte_path.write_bytes(pte)

    def et_load_first(path: Path = pte_path) -> Any:
        buffer = path.read_bytes()  # ExecuTorch reads from it for the module's lifetime
        module = et._load_for_executorch_from_buffer(buffer)
        return (module, buffer), module.forward(list(inputs))

    # handoff, xnnpack first (tvm takes what XNNPACK declines).
    result = handoff.partition(spec, backends=["xnnpack"], use_cache=False)
    hof = work / f"{spec[4:]}.hof"
    size = result.write(str(hof))
    coverage = result.report.coverage("xnnpack")

    def hof_load_first() -> Any:
        program = handoff.load(hof)
        return program, program.run(np_inputs)

    # The floor under handoff's load: the .pte inside its xnnpack blob, loaded by ExecuTorch the
    # way ExecuTorch's own program is (handoff's load = this + reading, checking and dispatching).
    from handoff.program import ProgramFile
    from handoff_xnnpack import _format

    with ProgramFile.open(hof) as pf:
        blobs = [pf.segment(d["segment"]) for d in pf.manifest["delegates"]]
        inner = work / f"{spec[4:]}.inner.pte" if len(blobs) == 1 else None
        if inner is not None:
            inner.write_bytes(bytes(_format.unpack(blobs[0])[1]))
        del blobs

    onnx_path = work / f"{spec[4:]}.onnx"
    torch.onnx.export(model, tuple(inputs), str(onnx_path), dynamo=True, external_data=False)

    def ort_load_first() -> Any:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return sess, sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), np_inputs)})

    (method, _buffer), et_first = et_load_first()
    program, hof_first = hof_load_first()
    sess, ort_first = ort_load_first()
    feeds = {i.name: a for i, a in zip(sess.get_inputs(), np_inputs)}
    with torch.no_grad():
        eager_first = model(*inputs)
        latency = interleaved_median_ms({
            "et": lambda: method.forward(list(inputs)),
            "hof": lambda: program.run(np_inputs),
            "eager": lambda: model(*inputs),
            "ort": lambda: sess.run(None, feeds),
        }, runs, warmup=10)
    program.close()
    load = interleaved_medians_ms({
        "et": et_load_first,
        "hof": lambda: hof_load_first()[0].close(),
        "ort": ort_load_first,
        **({"inner": lambda: et_load_first(inner)} if inner is not None else {}),
    }, loads, rounds=min(loads, 10))
    floor = [(" its blob's .pte, ExecuTorch alone", float("nan"), *load["inner"], inner.stat().st_size,
              err(et_load_first(inner)[1][0].numpy()))] if inner is not None else []
    if phases:
        print(f"\n{spec}: handoff's load + first run + close by phase, median main-thread CPU us of {phases} loads "
              f"(load average {os.getloadavg()[0]:.2f})")
        for name, us in phase_table(hof, np_inputs, phases):
            print(f"  {name:60} {us:9.1f}")
    nan = float("nan")
    return [
        ("executorch+xnnpack", latency["et"], *load["et"], len(pte), err(et_first[0].numpy())),
        (f"handoff xnnpack ({coverage:.0f}% nodes)", latency["hof"], *load["hof"], size, err(hof_first[0])),
        *floor,
        ("eager torch", latency["eager"], nan, nan, 0, err(eager_first.numpy())),
        ("onnxruntime cpu", latency["ort"], *load["ort"], onnx_path.stat().st_size, err(ort_first[0])),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="zoo:mobilenet_v2,zoo:small_transformer")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--loads", type=int, default=10, help="fresh loads timed for load + first inference")
    ap.add_argument("--phases", type=int, default=0, metavar="N",
                    help="also time N loads of handoff's program phase by phase (module docstring)")
    args = ap.parse_args()
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-bench-"))
    work = Path(tempfile.mkdtemp(prefix="handoff-xnn-"))
    import torch

    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; ratios are to executorch+xnnpack; load+1st: wall and process CPU time")

    def cell(x: float, ref: float, width: int, digits: int) -> str:
        return f"{x:{width}.{digits}f} {x / ref:6.2f}" if x == x else f"{'-':>{width}} {'-':>6}"

    for spec in args.models.split(","):
        rows = bench_model(spec, args.runs, args.loads, work, args.phases)
        ref = rows[0]
        print(f"\n{spec}")
        print(f"{'':34} {'median ms':>10} {'ratio':>6} {'load+1st ms':>12} {'ratio':>6} {'cpu ms':>8} {'ratio':>6} "
              f"{'size KB':>9} {'ratio':>6} {'max rel err':>11}")
        for name, med, load, load_cpu, size, err in rows:
            sz = f"{size / 1024:9.1f} {size / ref[4]:6.2f}" if size else f"{'-':>9} {'-':>6}"
            print(f"{name:34} {cell(med, ref[1], 10, 3)} {cell(load, ref[2], 12, 2)} {cell(load_cpu, ref[3], 8, 2)} "
                  f"{sz} {err:11.1e}")


if __name__ == "__main__":
    main()
