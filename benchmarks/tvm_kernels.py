"""Where an untuned TVM build spends its time: every kernel (PrimFunc) of a zoo model timed alone.

    python benchmarks/tvm_kernels.py [--model zoo:mobilenet_v2] [--schedule default] [--threads 1]

TVM 0.27's Relax VM has no profiler, so each PrimFunc the untuned pipeline schedules (handoff's
``_legalize`` and ``default_schedule``: the same passes as a ``tvm`` partition) is built alone and timed with TVM's
``time_evaluator`` (median of 5 repeats) on random buffers of the shapes ``main`` calls it with;
the table is sorted by time x calls. Kernel times only: no VM dispatch, no memory planning, so the
total is below the program's latency. Numbers only, not a test.
"""

from __future__ import annotations

import argparse
import collections
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--schedule", default="default", choices=["none", "dlight", "default"])
    ap.add_argument("--threads", type=int, default=1, help="TVM_NUM_THREADS (default 1)")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch
    import tvm
    from tvm import relax, tirx

    import handoff
    from handoff.tvm.compiler import TvmCompiler, _legalize
    from handoff.tvm.importer import import_partition
    from handoff.tvm.schedules import default_schedule
    from handoff.zoo import random_inputs

    zoo = handoff.get_plugins().zoo()[args.model.removeprefix("zoo:")]
    ep = torch.export.export(zoo.build().eval(), tuple(random_inputs(zoo.inputs, seed=7))).run_decompositions()
    mod, _, _ = import_partition(ep)
    target = TvmCompiler({}).target
    with target:
        mod = _legalize(target, args.schedule)(mod)
        if args.schedule != "none":
            mod = default_schedule(args.schedule)(mod)

    calls: collections.Counter = collections.Counter()
    types = {}
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir":
                name = call.args[0].name_hint
                calls[name] += 1
                types[name] = [a.ty for a in call.args[1].fields] + [call.ty]

    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    rows = []
    for gv, func in mod.functions_items():
        name = gv.name_hint
        if not isinstance(func, tirx.PrimFunc) or not calls[name]:
            continue
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()
        buffers = [tvm.runtime.tensor(rng.random([int(s) for s in t.shape]).astype(str(t.dtype).removeprefix("T.")), dev)
                   for t in types[name]]
        ms = float(np.median(lib.time_evaluator("main", dev, number=3, repeat=5, min_repeat_ms=20)(*buffers).results)) * 1e3
        shapes = " ".join("x".join(str(int(s)) for s in t.shape) for t in types[name])
        rows.append((ms * calls[name], ms, calls[name], name, shapes))
    rows.sort(reverse=True)
    print(f"{args.model}, schedule={args.schedule}, TVM_NUM_THREADS={args.threads}: "
          f"{sum(r[0] for r in rows):.2f} ms in {len(rows)} kernels")
    print(f"{'total ms':>9} {'ms/call':>8} {'calls':>5}  kernel  (buffer shapes)")
    for total, ms, n, name, shapes in rows:
        print(f"{total:9.3f} {ms:8.3f} {n:5d}  {name}  ({shapes})")


if __name__ == "__main__":
    main()
