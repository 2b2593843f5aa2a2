"""What the default schedules and MetaSchedule tuning buy the built-in TVM backend, against eager
torch in the same run.

    python benchmarks/tvm_tuning.py [--model zoo:mobilenet_v2] [--budget MINUTES | --trials N] [--runs 30]
    python benchmarks/tvm_tuning.py --rpc HOST:PORT --key K1,K2 [--model ...] [--trials N]
    python benchmarks/tvm_tuning.py --target aarch64 --qemu DIR [--model ...] [--schedules default] [--runs 10]

Partitions the model onto tvm untuned with each ``schedule`` option (``none``: TVM's CPU pipeline
as it is; ``dlight``: dlight's CPU rules; ``default``: those and handoff's rules), then, when
``--budget`` or ``--trials`` is given, tuned (into a fresh ``$HANDOFF_HOME`` unless one is set),
then tuned a second time to show the database is reused, and prints median latencies (after
warm-up) as ratios to eager torch. A tuned row also shows the tuning guard's decision from the
delegate's metadata (``tuning``): which build the partition kept and the two medians the guard
measured while partitioning (``tuned_ms``, ``untuned_ms``), and the per-function guard's before it:
how many tuned records it kept and dropped (their function's default schedule was faster), and a
table of each tuned function's median against its default schedule. Not a test: numbers only.

With ``--target aarch64 --qemu DIR``: the untuned rows are cross-compiled for aarch64
(``--option tvm.target=aarch64``) and run, with eager torch for aarch64 as the peer in the same
run, by an aarch64 Python under qemu-user (``_qemu_aarch64.py``: prepared into DIR on first use,
about 1.3 GB; needs ``apt-get install qemu-user gcc-aarch64-linux-gnu``). Errors are against that
eager torch and against eager torch on the host. Emulated times are indicative only (see
``_qemu_aarch64.py``); the aarch64 torch is 2.10.0, the newest CPU-only aarch64 wheel on PyPI.

With ``--rpc``: a tuning farm. For each key in turn, the same ``--trials N`` into a fresh tuning
database, candidates measured on the devices registered under that key (``handoff serve
--allow-tuning``); prints each key's server count, tuning wall time and its ratio to the first
key's, and the tuned program's median latency measured on a device of the key. Register one
server under K1 and two under K2 to see what a second device buys.

Only measuring is spread over the devices: MetaSchedule searches and builds every candidate
here. So the farm rows also split the wall time into building (``LocalBuilder.build``, summed),
measuring (from handing a batch to the RPC runner until its last result, intervals merged) and
the rest (search, cost model, database). ``--min-repeat-ms`` sets how long the device times each
candidate (MetaSchedule's ``min_repeat_ms``, default 100): a slow board measuring its kernels,
where a farm pays off, is emulated by a larger value. ``--model benchmarks/_dense.py:Dense`` is
one task (one round of 64 candidates with ``--trials 64``): little search, every candidate
measured.
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
    ap.add_argument("--min-repeat-ms", type=int, default=0,
                    help="with --rpc: how long a device times each candidate (MetaSchedule's min_repeat_ms; "
                         "default: its own, 100)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for torch and TVM alike (default: each its own default, one per core); 1 "
                         "compares kernels without thread-pool effects, e.g. on a shared machine")
    ap.add_argument("--target", choices=("host", "aarch64"), default="host",
                    help="tvm.target of the untuned rows; aarch64 needs --qemu")
    ap.add_argument("--qemu", metavar="DIR", type=Path,
                    help="with --target aarch64: the aarch64 Python to run under qemu-aarch64 (made on first use)")
    ap.add_argument("--aarch64-child", metavar="WORKDIR", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.aarch64_child:
        _aarch64_child(args.aarch64_child)
        return
    if args.rpc:
        farm(args)
        return
    if args.target == "aarch64":
        if not args.qemu:
            ap.error("--target aarch64 needs --qemu DIR: there is no aarch64 CPU here to time on")
        if args.trials or args.budget:
            ap.error("--target aarch64 times untuned builds only: tuning for aarch64 needs aarch64 devices (--rpc)")
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

    if args.target == "aarch64":
        aarch64(args, zoo.inputs, model, x, want)
        return
    built = []
    configs = [(f"tvm untuned, schedule={name}", {"schedule": name}) for name in args.schedules.split(",") if name]
    tuning = {**({"tune": str(args.trials)} if args.trials else {}),
              **({"tune_budget": str(args.budget)} if args.budget else {})}
    if tuning:
        what = f"{args.budget} min" if args.budget else f"{args.trials} trials"
        configs.append((f"tvm tuned ({what})", tuning))
        if not args.budget:  # a budget would spend itself again on the tasks left untuned
            configs.append(("tvm tuned, database reused", tuning))
    per_function: dict[str, list[str]] = {}
    for label, options in configs:
        t0 = time.perf_counter()
        result = handoff.partition(args.model, backends=[], options={"tvm": options}, use_cache=False)
        compile_s = time.perf_counter() - t0
        program = handoff.load(result.to_bytes())
        (got,) = program.run(x)
        err = float(np.abs(got - want).max() / (np.abs(want).max() or 1))
        built.append((label, program, compile_s, err, _guard(result.assembled.manifest)))
        if functions := _function_rows(result.assembled.manifest):
            per_function[label] = functions

    # Everyone timed in interleaved rounds (a shared machine's drift hits all alike).
    fns = {"eager torch": lambda: model(*x)}
    fns.update({label: (lambda p=program: p.run(x)) for label, program, *_ in built})
    with torch.no_grad():
        times = interleaved_median_ms(fns, args.runs, warmup=3)
    eager = times["eager torch"]
    rows = [("eager torch", eager, None, None, "")] + [(label, times[label], c, e, g) for label, _, c, e, g in built]

    print(f"{args.model}, {args.runs} runs after warm-up, torch threads {torch.get_num_threads()}, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'default')}, HANDOFF_HOME={os.environ['HANDOFF_HOME']}")
    print(f"{'':36} {'median ms':>10} {'x eager':>8} {'compile s':>10} {'max rel err':>12}  "
          f"tuning guard: kept (its tuned_ms / untuned_ms)")
    for label, ms, compile_s, err, guard in rows:
        c = f"{compile_s:10.1f}" if compile_s is not None else f"{'-':>10}"
        e = f"{err:12.1e}" if err is not None else f"{'-':>12}"
        print(f"{label:36} {ms:10.2f} {ms / eager:8.2f} {c} {e}  {guard or '-'}")
    for label, lines in per_function.items():
        print(f"\n{label}: per-function guard, each tuned function timed alone against its default schedule "
              f"while partitioning (largest default first)")
        print(f"  {'function':60} {'tuned ms':>9} {'default ms':>10} {'speedup':>8}  kept")
        print("\n".join(lines))


def _guard(manifest: dict) -> str:
    """The tuning guard's decision for each tvm delegate of a program (its metadata's ``tuning``:
    the build kept and the medians the guard measured), ``; ``-joined; empty when nothing was tuned."""
    out = []
    for d in manifest["delegates"]:
        tuning = d["metadata"].get("tuning") if d["backend"] == "tvm" else None
        if not tuning:
            continue
        kept = tuning.get("kept", "?")
        if "tuned_ms" in tuning:
            kept += f" ({tuning['tuned_ms']:.2f} / {tuning['untuned_ms']:.2f} ms)"
        functions = tuning.get("functions") or {}
        out.append(f"{kept}; {tuning.get('tasks', 0)} tasks, {tuning.get('rounds')} rounds"
                   + (", budget spent" if tuning.get("stopped_by_budget") else "")
                   + (f"; records kept {functions['records_kept']}, dropped {functions['records_dropped']}"
                      f" (default schedule faster), untimed {functions['untimed']}"
                      f", medians from an earlier run {functions.get('timed_before', 0)}" if functions else ""))
    return "; ".join(out)


def _function_rows(manifest: dict) -> list[str]:
    """The per-function guard's medians of each tvm delegate (metadata ``tuning.functions``): each
    tuned function against its default schedule, timed alone while partitioning."""
    rows = []
    for d in manifest["delegates"]:
        medians = ((d["metadata"].get("tuning") or {}).get("functions") or {}).get("medians_ms", {})
        for name, m in sorted(medians.items(), key=lambda item: -item[1]["default"]):
            rows.append(f"  {name:60} {m['tuned']:9.4f} {m['default']:10.4f} "
                        f"{m['default'] / m['tuned'] if m['tuned'] else float('nan'):8.2f}  {m['kept']}")
    return rows


def aarch64(args: argparse.Namespace, specs, model, x, want: np.ndarray) -> None:
    """Cross-compile each ``--schedules`` row for aarch64 here, then time the programs and eager torch
    for aarch64 interleaved in one aarch64 Python under qemu (:func:`_aarch64_child`)."""
    import json

    import torch

    import handoff
    import _qemu_aarch64
    from _qemu_aarch64 import prepare, python

    prepare(args.qemu)
    work = Path(tempfile.mkdtemp(prefix="handoff-bench-aarch64-"))
    rows = []
    for i, name in enumerate(n for n in args.schedules.split(",") if n):
        t0 = time.perf_counter()
        result = handoff.partition(args.model, backends=[], use_cache=False,
                                   options={"tvm": {"schedule": name, "target": "aarch64"}})
        compile_s = time.perf_counter() - t0
        result.write(work / f"p{i}.hof")
        rows.append({"label": f"tvm untuned aarch64, schedule={name}", "file": f"p{i}.hof", "compile_s": compile_s})
    torch.save(model, work / "model.pt")
    np.savez(work / "inputs.npz", want=want, **{f"x{i}": t.numpy() for i, t in enumerate(x)})
    (work / "config.json").write_text(json.dumps({"rows": rows, "runs": args.runs, "threads": args.threads}))
    t0 = time.perf_counter()
    python(args.qemu, [str(Path(__file__).resolve()), "--aarch64-child", str(work)], dict(os.environ))
    wall = time.perf_counter() - t0
    res = json.loads((work / "results.json").read_text())
    eager = res["eager torch"]["ms"]
    print(f"{args.model} for aarch64 under qemu-aarch64 -cpu {os.environ.get('QEMU_CPU', _qemu_aarch64.CPU)} "
          f"(emulated: ratios indicative only), {args.runs} runs after "
          f"warm-up, torch {res['torch']} threads {res['torch_threads']}, TVM_NUM_THREADS="
          f"{os.environ.get('TVM_NUM_THREADS', 'default')}, qemu run {wall:.0f} s, programs in {work}")
    print(f"{'':42} {'median ms':>10} {'x eager':>8} {'compile s':>10} {'rel err':>9} {'vs host':>9}")
    print(f"{'eager torch (aarch64, qemu)':42} {eager:10.2f} {1:8.2f} {'-':>10} {'-':>9} "
          f"{res['eager torch']['err_host']:9.1e}")
    for row in rows:
        r = res[row["label"]]
        print(f"{row['label']:42} {r['ms']:10.2f} {r['ms'] / eager:8.2f} {row['compile_s']:10.1f} {r['err']:9.1e} "
              f"{r['err_host']:9.1e}")


def _aarch64_child(work: Path) -> None:
    """Under qemu, in the aarch64 Python: load each program and the eager model, check the programs
    against eager torch on this (emulated) machine, and time them all interleaved. Writes
    ``results.json``: per row the median ms, the max error relative to this eager torch's output
    (``err``) and to the host's (``err_host``)."""
    import json
    import platform

    import torch

    import handoff

    assert platform.machine() == "aarch64", platform.machine()
    cfg = json.loads((work / "config.json").read_text())
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model = torch.load(work / "model.pt", weights_only=False).eval()
    data = np.load(work / "inputs.npz")
    x = tuple(torch.from_numpy(data[f"x{i}"]) for i in range(len(data.files) - 1))
    host = data["want"]

    def err(got, ref) -> float:
        return float(np.abs(got - ref).max() / (np.abs(ref).max() or 1))

    with torch.no_grad():
        mine = model(*x).numpy()
        res = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "eager torch": {"err_host": err(mine, host)}}
        fns = {"eager torch": lambda: model(*x)}
        for row in cfg["rows"]:
            program = handoff.load(work / row["file"])
            (got,) = program.run(x)
            res[row["label"]] = {"err": err(got, mine), "err_host": err(got, host)}
            fns[row["label"]] = lambda p=program: p.run(x)
        for label, ms in interleaved_median_ms(fns, cfg["runs"], rounds=min(10, cfg["runs"]), warmup=1).items():
            res[label]["ms"] = ms
    (work / "results.json").write_text(json.dumps(res))


def farm(args: argparse.Namespace) -> None:
    import handoff
    from handoff.program import ProgramFile, io_specs
    from handoff.remote import Tracker, parse_keys, run_remote
    from handoff.signing import local_key

    signer = local_key().path  # the devices trust this key (handoff serve --trusted-keys)
    import tvm.s_tir.tensor_intrin  # noqa: F401  MetaSchedule imports it once per process: not in the first key's time

    clock = _TuningClock(args.min_repeat_ms)
    rows = []
    for key in parse_keys(args.key):
        home = Path(tempfile.mkdtemp(prefix=f"handoff-bench-{key}-"))  # a fresh tuning database per key
        (home / "keys").mkdir(mode=0o700)
        shutil.copy2(signer, home / "keys" / signer.name)
        os.environ["HANDOFF_HOME"] = str(home)
        with Tracker(args.rpc) as tracker:
            servers = tracker.servers(key)
        clock.reset()
        t0 = time.perf_counter()
        result = handoff.partition(args.model, backends=[], use_cache=False,
                                   options={"tvm": {"tune": str(args.trials), "rpc": f"{args.rpc}/{key}"}})
        wall = time.perf_counter() - t0
        build_s, measure_s, candidates = clock.build_s, clock.measure_s(), clock.candidates
        data = result.to_bytes()
        with ProgramFile.from_bytes(data) as pf:
            specs, _ = io_specs(pf.manifest)
        rng = np.random.default_rng(5)
        x = [rng.standard_normal(shape).astype(dtype) for _, shape, dtype in specs]
        remote = run_remote(data, args.rpc, key, x, bench=args.runs, warmup=5)
        rows.append((key, servers, wall, build_s, measure_s, candidates, float(np.median(remote.times_ms))))
    repeat = args.min_repeat_ms or "100 (default)"
    print(f"{args.model}, {args.trials} trials per key, min_repeat_ms {repeat}, tracker {args.rpc}, {args.runs} runs "
          f"on the device")
    print(f"{'key':12} {'servers':>7} {'cands':>6} {'tuning wall s':>14} {'x first':>8} {'build s':>8} "
          f"{'measure s':>10} {'x first':>8} {'other s':>8} {'median ms':>10}")
    first = rows[0]
    for key, servers, wall, build_s, measure_s, candidates, ms in rows:
        print(f"{key:12} {servers:7d} {candidates:6d} {wall:14.1f} {wall / first[2]:8.2f} {build_s:8.1f} "
              f"{measure_s:10.1f} {measure_s / (first[4] or 1):8.2f} {wall - build_s - measure_s:8.1f} {ms:10.2f}")


class _TuningClock:
    """Times MetaSchedule's local building and remote measuring in this process by wrapping
    ``LocalBuilder.build`` (synchronous) and ``RPCRunner.run`` (asynchronous: a batch is measured
    from its hand-over until its last future completes); ``min_repeat_ms`` replaces the runner's
    evaluator setting when given."""

    def __init__(self, min_repeat_ms: int) -> None:
        from tvm.s_tir.meta_schedule.builder import LocalBuilder
        from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCRunner

        clock = self
        self.reset()
        builder_cls, runner_cls = LocalBuilder._cls, RPCRunner._cls  # the Python classes behind @derived_object
        build, run, init = builder_cls.build, runner_cls.run, runner_cls.__init__

        def timed_build(builder, inputs):
            t0 = time.perf_counter()
            try:
                return build(builder, inputs)
            finally:
                clock.build_s += time.perf_counter() - t0

        def timed_run(runner, inputs):
            start = time.perf_counter()
            futures = run(runner, inputs)
            interval = [start, start]
            clock.intervals.append(interval)
            clock.candidates += len(futures)

            def finished(_future):
                interval[1] = max(interval[1], time.perf_counter())

            for f in futures:
                f.future.add_done_callback(finished)
            return futures

        def init_with_repeat(runner, rpc_config=None, evaluator_config=None, *rest, **kwargs):
            if min_repeat_ms:
                evaluator_config = EvaluatorConfig(min_repeat_ms=min_repeat_ms)
            init(runner, rpc_config, evaluator_config, *rest, **kwargs)

        builder_cls.build, runner_cls.run, runner_cls.__init__ = timed_build, timed_run, init_with_repeat

    def reset(self) -> None:
        self.build_s, self.intervals, self.candidates = 0.0, [], 0

    def measure_s(self) -> float:
        """Seconds during which at least one batch was being measured (overlaps counted once)."""
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total


if __name__ == "__main__":
    main()
