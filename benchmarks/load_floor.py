"""How low a Python load + first inference + close can go: handoff's per-load work added step by step.

    python benchmarks/load_floor.py [--model zoo:small_transformer] [--loads 3000]

Issue 15 asks for load + first inference <= 1.10x ExecuTorch's (``xnnpack_vs_executorch.py``).
This script measures, in one process with the contenders interleaved (``_timing``), what each
part of a load of an unchanged, recorded ``.hof`` costs on top of ExecuTorch, by building the
load up from ExecuTorch's own calls:

1. ``executorch``: ExecuTorch alone on the ``.pte`` inside handoff's XNNPACK blob, the way its
   own program is loaded (read the file, ``_load_for_executorch_from_buffer``, ``forward``): the
   reference every ratio is taken against.
2. ``bare calls``: only the calls handoff's XNNPACK runtime makes (``_load_program_from_buffer``,
   ``load_method``, ``torch.from_numpy``, the method, ``Tensor.numpy``) on ``.pte`` bytes already
   in memory, plus the file's ``open``/``fstat``/header ``read``/``close`` that detecting a changed
   file cannot skip.
3. ``+ change detection``: the record's key from ``$HANDOFF_HOME`` and the ``stat``, the lookup of
   the earlier open and the header compare (``handoff.program.ProgramFile.open``'s checks, written
   out flat).
4. ``+ per-load decisions``: what handoff decides again on every load because it may have changed
   (docs/security.md): the run-bytes cap (an environment variable), whether the runtime is still
   available, whether the blob is known to load safely (``handoff.probe``), the segment's view.
5. ``+ plugin runtime``: the XNNPACK runtime's own ``load``/``execute``/``release`` (its Python:
   the blob's ``.pte`` found again, options, input checks, the pool lock) instead of the bare calls.
6. ``handoff``: ``handoff.load`` + ``Program.run`` + ``close``, the row of
   ``xnnpack_vs_executorch.py``.

A program over 1 MiB (``READ_BELOW_BYTES``; MobileNetV2) is mapped on every open: rows 2-5 then
map it too and copy the ``.pte`` out of the mapping on every load (the binding takes ``bytes``),
as the runtime did before ``handoff.blob_key`` let it keep that copy for the unchanged recorded
file; row 6 shows what keeping it saves.

Rows 2-5 are written flat, without handoff's objects: row 4 is the floor of any Python load that
keeps handoff's checks, row 5 adds the XNNPACK runtime's Python as it is, and what lies between
row 5 and row 6 is handoff's structure (the Program and ProgramFile objects, the load and run
plans, ``close``). Median CPU time of this thread (``time.thread_time``: ExecuTorch's pool workers are left
out, so a sleeping worker does not blur the steps) and the wall time. Not a test; numbers only.
"""

from __future__ import annotations

import argparse
import mmap
import os
import stat
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="zoo:small_transformer")
    parser.add_argument("--loads", type=int, default=3000, help="timed loads per row")
    args = parser.parse_args()

    import torch
    from executorch.extension.pybindings import _C as et

    import handoff
    from handoff import limits, probe
    from handoff.limits import RUN_BYTES_NOTE
    from handoff.program import _OPENED, HEADER_SIZE, READ_BELOW_BYTES, ProgramFile, _opened_key  # the earlier opens, their keys
    from handoff.zoo import random_inputs
    from handoff_xnnpack import _format

    name = args.model.removeprefix("zoo:")
    zoo = handoff.get_plugins().zoo()[name]
    inputs = random_inputs(zoo.inputs, seed=7)
    arrays = [t.numpy() for t in inputs]
    work = Path(tempfile.mkdtemp(prefix="load-floor-"))
    hof = str(work / f"{name}.hof")
    handoff.partition(args.model, backends=["xnnpack"], use_cache=False).write(hof)
    with ProgramFile.open(hof) as pf:
        delegates = pf.manifest["delegates"]
        if len(delegates) != 1:
            raise SystemExit(f"{args.model}: {len(delegates)} delegates; this script takes a model XNNPACK runs whole")
        entry = delegates[0]
        pte = bytes(_format.unpack(pf.segment(entry["segment"]))[1])
    pte_path = work / f"{name}.pte"
    pte_path.write_bytes(pte)

    program = handoff.load(hof)  # records the file and vouches for its blob, as a first load does
    program.run(arrays)
    notes = dict(program.file.notes)
    program.close()
    probe_key = next(v for k, v in notes.items() if k.startswith("probe-key "))
    run_bytes = int(notes[RUN_BYTES_NOTE])
    plugins = handoff.get_plugins()
    runtime = plugins.runtime("xnnpack")
    verification = et.Verification.InternalConsistency

    def executorch() -> None:
        buffer = pte_path.read_bytes()  # ExecuTorch reads from it for the module's lifetime
        module = et._load_for_executorch_from_buffer(buffer)
        module.forward(list(inputs))

    mapped = os.path.getsize(hof) > READ_BELOW_BYTES  # ProgramFile.open maps such a file on every open
    segment = entry["segment"]
    at = Path(hof).read_bytes().find(pte)  # where the .pte lies in the file: a mapped file's copy is made from there

    def file_calls() -> tuple[os.stat_result, Any]:
        """The file's stat and header, and for a mapped file the mapping (the caller closes it)."""
        fd = os.open(hof, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if mapped:
                return st, mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return st, os.read(fd, HEADER_SIZE)
        finally:
            os.close(fd)

    def et_calls(data: bytes) -> None:
        method = et._load_program_from_buffer(data, enable_etdump=False, debug_buffer_size=0,
                                              program_verification=verification, data_path=None).load_method("forward")
        [out.numpy() for out in method([torch.from_numpy(a) for a in arrays])]

    def et_from(mm: Any) -> None:
        """``et_calls`` on the .pte: a mapped file's copied out of the mapping (the binding takes bytes)."""
        if mm is None:
            et_calls(pte)
            return
        data = mm[at:at + len(pte)]
        mm.close()
        et_calls(data)

    def bare() -> None:
        _, head = file_calls()
        et_from(head if mapped else None)

    def detect() -> tuple[Any, Any]:
        st, head = file_calls()
        if not stat.S_ISREG(st.st_mode):
            raise SystemExit("not a regular file")
        kept = _OPENED.get(_opened_key(st))
        if kept is None or kept.head != head[:HEADER_SIZE]:
            raise SystemExit("the earlier open is not kept: run against this checkout's handoff")
        return kept, head if mapped else None

    def changes() -> None:
        et_from(detect()[1])

    def decide() -> tuple[memoryview, Any]:
        kept, mm = detect()
        limits.check_run_bytes(kept.manifest, hof, run_bytes)
        if not plugins.runtime_available("xnnpack")[0] or not probe.is_known("xnnpack", probe_key):
            raise SystemExit("runtime unavailable or blob unknown")
        offset, length = kept.segments[segment][:2]
        return memoryview(kept.data if mm is None else mm)[offset:offset + length], mm

    def decisions() -> None:
        blob, mm = decide()
        blob.release()
        et_from(mm)

    def plugin() -> None:
        blob, mm = decide()
        handle = runtime.load(blob, entry["metadata"], {})
        outs = runtime.execute(handle, arrays)
        [o if o.flags.writeable else o.copy() for o in outs]
        runtime.release(handle)
        if mm is not None:
            blob.release()
            mm.close()

    def full() -> None:
        p = handoff.load(hof)
        p.run(arrays)
        p.close()

    rows: dict[str, Callable[[], None]] = {
        "executorch (its .pte read, loaded, run)": executorch, "bare calls": bare,
        "+ change detection": changes, "+ per-load decisions": decisions, "+ plugin runtime": plugin,
        "handoff.load + run + close": full,
    }
    samples: dict[str, tuple[list[int], list[int]]] = {k: ([], []) for k in rows}
    for fn in rows.values():
        for _ in range(100):
            fn()
    per = 50
    order = list(rows.items())
    for r in range(max(1, args.loads // per)):
        for label, fn in order[r % len(order):] + order[:r % len(order)]:
            wall, cpu = samples[label]
            for _ in range(per):
                w, c = time.perf_counter_ns(), time.thread_time_ns()
                fn()
                cpu.append(time.thread_time_ns() - c)
                wall.append(time.perf_counter_ns() - w)
    ref_wall, ref_cpu = (statistics.median(v) / 1e3 for v in samples[next(iter(rows))])
    print(f"{args.model}: load + first inference + close, median of {args.loads} per row "
          f"(load average {os.getloadavg()[0]:.2f})")
    print(f"  {'':42} {'cpu us':>8} {'ratio':>6} {'step':>7} {'wall us':>8} {'ratio':>6}")
    last = None
    for label in rows:
        w, c = (statistics.median(v) / 1e3 for v in samples[label])
        step = "" if last is None or label == next(iter(rows)) else f"{c - last:+7.1f}"
        print(f"  {label:42} {c:8.1f} {c / ref_cpu:6.3f} {step:>7} {w:8.1f} {w / ref_wall:6.3f}")
        last = c


if __name__ == "__main__":
    main()
