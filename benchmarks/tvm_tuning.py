"""What the default schedules and MetaSchedule tuning buy the built-in TVM backend, against eager
torch in the same run.

    python benchmarks/tvm_tuning.py [--model zoo:mobilenet_v2] [--budget MINUTES | --trials N] [--runs 30]
    python benchmarks/tvm_tuning.py --rpc HOST:PORT --key K1,K2 [--model ...] [--trials N]

Partitions the model onto tvm untuned with each ``schedule`` option (``none``: TVM's CPU pipeline
as it is; ``dlight``: dlight's CPU rules; ``default``: those and handoff's rules), then, when
``--budget`` or ``--trials`` is given, tuned (into a fresh ``$HANDOFF_HOME`` unless one is set),
then tuned a second time to show the database is reused, and prints median latencies (after
warm-up) as ratios to eager torch. Not a test: numbers only.

With ``--rpc``: a tuning farm. For each key in turn, the same ``--trials N`` into a fresh tuning
database, candidates measured on the devices registered under that key (``handoff serve
--allow-tuning``); prints each key's server count, tuning wall time and its ratio to the first
key's, and the tuned program's median latency measured on a device of the key. Register one
server under K1 and two under K2 to see what a second device buys.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import interleaved_median_ms  # benchmarks/, next to this script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials (tvm.tune)")
    ap.add_argument("--budget", type=int, default=0, help="minutes of tuning (tvm.tune_budget)")
    ap.add_argument("--schedules", default="none,dlight,default", help="untuned rows to time")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rpc", metavar="HOST:PORT", help="TVM RPC tracker of a tuning farm (see the docstring)")
    ap.add_argument("--key", default="", help="with --rpc: device keys, comma-separated")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for torch and TVM alike (default: each its own default, one per core); 1 "
                         "compares kernels without thread-pool effects, e.g. on a shared machine")
    args = ap.parse_args()
    if args.rpc:
        farm(args)
        return
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-bench-"))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import handoff
    from handoff.zoo import random_inputs

    zoo = handoff.get_plugins().zoo()[args.model.removeprefix("zoo:")]
    model = zoo.build()
    x = random_inputs(zoo.inputs, seed=5)
    with torch.no_grad():
        want = model(*x).numpy()

    built = []
    configs = [(f"tvm untuned, schedule={name}", {"schedule": name}) for name in args.schedules.split(",") if name]
    tuning = {**({"tune": str(args.trials)} if args.trials else {}),
              **({"tune_budget": str(args.budget)} if args.budget else {})}
    if tuning:
        what = f"{args.budget} min" if args.budget else f"{args.trials} trials"
        configs.append((f"tvm tuned ({what})", tuning))
        if not args.budget:  # a budget would spend itself again on the tasks left untuned
            configs.append(("tvm tuned, database reused", tuning))
    for label, options in configs:
        t0 = time.perf_counter()
        result = handoff.partition(args.model, backends=[], options={"tvm": options}, use_cache=False)
        compile_s = time.perf_counter() - t0
        program = handoff.load(result.to_bytes())
        (got,) = program.run(x)
        err = float(np.abs(got - want).max() / (np.abs(want).max() or 1))
        built.append((label, program, compile_s, err))

    # Everyone timed in interleaved rounds (a shared machine's drift hits all alike).
    fns = {"eager torch": lambda: model(*x)}
    fns.update({label: (lambda p=program: p.run(x)) for label, program, _, _ in built})
    with torch.no_grad():
        times = interleaved_median_ms(fns, args.runs, warmup=3)
    eager = times["eager torch"]
    rows = [("eager torch", eager, None, None)] + [(label, times[label], c, e) for label, _, c, e in built]

    print(f"{args.model}, {args.runs} runs after warm-up, torch threads {torch.get_num_threads()}, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'default')}, HANDOFF_HOME={os.environ['HANDOFF_HOME']}")
    print(f"{'':36} {'median ms':>10} {'x eager':>8} {'compile s':>10} {'max rel err':>12}")
    for label, ms, compile_s, err in rows:
        c = f"{compile_s:10.1f}" if compile_s is not None else f"{'-':>10}"
        e = f"{err:12.1e}" if err is not None else f"{'-':>12}"
        print(f"{label:36} {ms:10.2f} {ms / eager:8.2f} {c} {e}")


def farm(args: argparse.Namespace) -> None:
    import handoff
    from handoff.program import ProgramFile, io_specs
    from handoff.remote import Tracker, parse_keys, run_remote

    from handoff.signing import local_key

    signer = local_key().path  # the devices trust this key (handoff serve --trusted-keys)
    import tvm.s_tir.tensor_intrin  # noqa: F401  MetaSchedule imports it once per process: not in the first key's time
    rows = []
    for key in parse_keys(args.key):
        home = Path(tempfile.mkdtemp(prefix=f"handoff-bench-{key}-"))  # a fresh tuning database per key
        (home / "keys").mkdir(mode=0o700)
        shutil.copy2(signer, home / "keys" / signer.name)
        os.environ["HANDOFF_HOME"] = str(home)
        with Tracker(args.rpc) as tracker:
            servers = tracker.servers(key)
        t0 = time.perf_counter()
        result = handoff.partition(args.model, backends=[], use_cache=False,
                                   options={"tvm": {"tune": str(args.trials), "rpc": f"{args.rpc}/{key}"}})
        wall = time.perf_counter() - t0
        data = result.to_bytes()
        with ProgramFile.from_bytes(data) as pf:
            specs, _ = io_specs(pf.manifest)
        rng = np.random.default_rng(5)
        x = [rng.standard_normal(shape).astype(dtype) for _, shape, dtype in specs]
        remote = run_remote(data, args.rpc, key, x, bench=args.runs, warmup=5)
        rows.append((key, servers, wall, float(np.median(remote.times_ms))))
    print(f"{args.model}, {args.trials} trials per key, tracker {args.rpc}, {args.runs} runs on the device")
    print(f"{'key':16} {'servers':>8} {'tuning wall s':>14} {'x first key':>12} {'median ms':>10}")
    for key, servers, wall, ms in rows:
        print(f"{key:16} {servers:8d} {wall:14.1f} {wall / rows[0][2]:12.2f} {ms:10.2f}")


if __name__ == "__main__":
    main()
