"""Instructions per load + first inference + close: handoff's xnnpack program against ExecuTorch
alone loading the ``.pte`` inside it, counted by valgrind's callgrind.

    python benchmarks/load_instructions.py [--model zoo:small_transformer] [--loads 20] [--work DIR]

On a shared machine wall and CPU times of a sub-millisecond load move by tens of percent from
run to run with the neighbours' load; instruction counts do not: the same code on the same inputs
executes the same instructions (the figure that says how much work handoff adds on top of
ExecuTorch, though not what that work costs in cache misses: ``xnnpack_vs_executorch.py --phases``).
Each contender runs in its own process under ``valgrind --tool=callgrind`` with instrumentation
off until ``--loads`` warm loads (the file recorded, the plans made, the runtime started) have run,
then counts ``--loads`` more (a tiny C helper, built here with gcc, issues callgrind's client
requests around them). ExecuTorch's thread pool is set to one thread in both, so no worker spins
while it waits. ``--work`` keeps the partitioned program and the ``.pte`` between runs (the same
bytes for a before/after comparison). Prints instructions per load for each and their ratio.
Not a test; numbers only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_HELPER = r"""
#include <valgrind/callgrind.h>
void count_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; CALLGRIND_TOGGLE_COLLECT; }
void count_stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _child(which: str, work: Path, loads: int, helper: str) -> None:
    """Runs under callgrind: warm up, then count ``loads`` loads + first run + close."""
    import ctypes

    import numpy as np
    import torch
    from executorch.extension.pybindings import _C

    import handoff

    _C._unsafe_reset_threadpool(1)
    counter = ctypes.CDLL(helper)
    x = np.random.default_rng(7).standard_normal(tuple(np.load(work / "input_shape.npy")), dtype=np.float32)
    hof, pte = str(work / "program.hof"), str(work / "program.pte")
    tensor = torch.from_numpy(x)

    def with_handoff() -> None:
        program = handoff.load(hof)
        program.run([x])
        program.close()

    def executorch_alone() -> None:  # the way handoff's xnnpack runtime calls the binding
        with open(pte, "rb") as f:
            data = f.read()
        program = _C._load_program_from_buffer(data, enable_etdump=False, debug_buffer_size=0,
                                               program_verification=_C.Verification.InternalConsistency,
                                               data_path=None)
        program.load_method("forward")([tensor])

    once = with_handoff if which == "handoff" else executorch_alone
    for _ in range(loads):
        once()
    counter.count_start()
    for _ in range(loads):
        once()
    counter.count_stop()


def _prepare(spec: str, work: Path) -> None:
    import numpy as np

    import handoff
    from handoff.program import ProgramFile
    from handoff.zoo import random_inputs
    from handoff_xnnpack import _format

    zoo = handoff.get_plugins().zoo()[spec.removeprefix("zoo:")]
    (shape,) = [tuple(t.shape) for t in random_inputs(zoo.inputs, seed=7)]
    handoff.partition(spec, backends=["xnnpack"], use_cache=False).write(str(work / "program.hof"))
    with ProgramFile.open(work / "program.hof") as pf:
        (delegate,) = pf.manifest["delegates"]
        (work / "program.pte").write_bytes(bytes(_format.unpack(pf.segment(delegate["segment"]))[1]))
    np.save(work / "input_shape.npy", np.array(shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:small_transformer", help="a zoo model with one input, all on xnnpack")
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--work", type=Path, help="keeps the program between runs (made when missing)")
    ap.add_argument("--child", choices=["handoff", "executorch"], help=argparse.SUPPRESS)
    ap.add_argument("--helper", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="handoff-instr-"))
    if args.child:
        _child(args.child, work, args.loads, args.helper)
        return
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HANDOFF_HOME", str(work / "home"))
    if not (work / "program.hof").exists():
        _prepare(args.model, work)
    helper = work / "count.so"
    source = work / "count.c"
    source.write_text(_HELPER)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(helper), str(source)], check=True)
    counts = {}
    for which in ("executorch", "handoff"):
        out = work / f"callgrind.{which}.out"
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
                        f"--callgrind-out-file={out}", sys.executable, __file__, "--child", which,
                        "--loads", str(args.loads), "--work", str(work), "--helper", str(helper)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONHASHSEED": "0"})  # the same str hashes, so the same dict probes
        totals = re.search(r"^totals: (\d+)", out.read_text(), re.M)
        counts[which] = int(totals.group(1)) / args.loads if totals else float("nan")
    et, ho = counts["executorch"], counts["handoff"]
    print(f"{args.model}: instructions per load + first inference + close ({args.loads} loads each, "
          f"callgrind, 1 thread)")
    print(f"  executorch alone (its .pte)  {et:12,.0f}")
    print(f"  handoff xnnpack              {ho:12,.0f}  ratio {ho / et:.3f}  handoff's own {ho - et:,.0f}")


if __name__ == "__main__":
    main()
