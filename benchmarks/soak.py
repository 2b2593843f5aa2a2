"""Soak: many runs of one loaded program per zoo model and backend, watching memory and latency.

    python benchmarks/soak.py [--runs 10000] [--seconds 0] [--warmup 200] [--threads 8] [--option B.NAME=V]
                              [--no-reference] [--programs DIR] [--models M,...] [--backends tvm,xnnpack,vulkan,qnn]

For each zoo model and each runnable backend (``--backends B`` with the tvm fallback for what B
declines, as ``handoff partition`` does; ``--models`` defaults to every zoo model), the program is
partitioned (the lowering cache makes a second soak cheaper; ``--programs DIR`` keeps the programs
and reuses one already there, so a short estimating run and the long soak after it export and
lower each model once), loaded once, and run ``--warmup`` times on fresh random inputs, then ``--runs``
times, one call at a time, in this process. ``--seconds S`` bounds each program's timed loop (the
runs made are printed), so that a slow program (mobilenet_v2 on an emulator) cannot keep the soak
from reaching the others. It prints per program: the runs made, the process RSS after warm-up and
at the end and its growth (target: under 1%), the growth over the second half of the runs alone
(a leak grows in both halves, an allocator's one-off step in one), and the p50, p99 and max
latency with p99/p50 (target: at most 2).

On a shared machine the wall-clock tail is mostly the scheduler: a run that was preempted, or
whose thread pool worker waited for a time slice, takes a whole time slice longer. So each run is
also timed in CPU time (``time.process_time``: every thread of the process, the vendor runtime's
thread pool included) and ``getrusage`` is read around it; a second line per program gives the CPU
p50, p99 and p99/p50, the involuntary context switches over the timed window and how many runs
had at least one, and the wall p99 of the runs that had none. A wall tail with a flat CPU tail is
preemption, not the runtime. A third line takes the slow runs (CPU time over twice its median)
apart: how many had a garbage collection (``gc.callbacks``), page faults or a switch, and how
many sat next to a slow run of the fixed-work reference, a fourth line: vector arithmetic of
about a run's median CPU time, timed after every run (``--reference-every K``: every K-th, so a
long soak of a slow program spends 1/K of its time on it rather than half; ``--no-reference``
skips it), whose spread is the machine's own. A CPU tail in runs without a collection, fault or switch, which the
reference shares, is the machine's: on this project's 2-vCPU VMs a fixed-work loop alone shows a
p99/p50 of 2-3 at times. Inputs are drawn before the timed loop (``--inputs`` distinct ones, used
in turn), so the loop measures ``Program.run`` alone. Then the thread check: ``--threads`` threads run the
``--inputs`` inputs ``--thread-rounds`` times over on the same Program at once, and every output
must equal the single-threaded run's bit for bit ("threads ok", or how many differed / what
raised). Exit status 1 when a target is missed. Not a test: the issue asks for the numbers in its
closing note. On a shared machine a neighbour's load shows up in p99; say so when quoting.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time

import numpy as np


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux) or getrusage's peak elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def soak(path: str, runs: int, seconds: float, warmup: int, distinct: int, threads: int, rounds: int,
         options: dict | None = None, reference: bool = True, reference_every: int = 1) -> dict:
    import handoff

    rng = np.random.default_rng(0)
    with handoff.load(path, options=options) as program:
        specs = program.input_specs
        inputs = [[rng.standard_normal(shape).astype(dtype) if dtype.startswith("float")
                   else rng.integers(0, 8, shape).astype(dtype) for _, shape, dtype in specs] for _ in range(distinct)]
        want = [program.run(x) for x in inputs]
        stop = time.perf_counter() + seconds / 5 if seconds > 0 else float("inf")
        for i in range(warmup):
            program.run(inputs[i % distinct])
            if time.perf_counter() > stop:
                break
        work = _reference_work(program, inputs) if reference else None
        # The samples go into arrays allocated and written before the first RSS reading: appended to
        # lists, 10,000 runs' floats and slots took ~1 MB, counted as the program's RSS growth
        # (0.2-0.6% of a 260-310 MB process, measured).
        step = max(1, runs // 20)  # RSS every 1/20th of the runs: a leak grows in both halves, a step in one
        times, cpu, ref = np.full(runs, np.nan), np.full(runs, np.nan), np.full(runs, np.nan)
        switched, faults, collected = (np.full(runs, -1, dtype=np.int64) for _ in range(3))
        marks = np.full(runs // step + 1, -1, dtype=np.int64)
        gc.collect()
        before = rss_bytes()
        collections = [0]
        made = 0

        def count(phase: str, info: dict) -> None:
            collections[0] += phase == "start"

        gc.callbacks.append(count)
        stop = time.perf_counter() + seconds if seconds > 0 else float("inf")
        usage, process_time, perf_counter = resource.getrusage, time.process_time, time.perf_counter
        first = usage(resource.RUSAGE_SELF).ru_nivcsw
        try:
            for i in range(runs):
                if i % step == 0:
                    marks[i // step] = rss_bytes()
                u0, g0 = usage(resource.RUSAGE_SELF), collections[0]
                c0 = process_time()
                t0 = perf_counter()
                program.run(inputs[i % distinct])
                t1 = perf_counter()
                c1 = process_time()
                u1 = usage(resource.RUSAGE_SELF)
                switched[i] = u1.ru_nivcsw - u0.ru_nivcsw
                faults[i] = u1.ru_minflt - u0.ru_minflt + u1.ru_majflt - u0.ru_majflt
                collected[i] = collections[0] - g0
                times[i] = t1 - t0
                cpu[i] = c1 - c0
                made = i + 1
                if work is not None and i % reference_every == 0:
                    r0 = process_time()
                    work()
                    ref[i] = process_time() - r0
                if t1 > stop:
                    break
        finally:
            gc.callbacks.remove(count)
        involuntary = usage(resource.RUSAGE_SELF).ru_nivcsw - first
        gc.collect()
        after = rss_bytes()
        threaded = check_threads(program, inputs, want, threads, rounds, seconds / 2)
    n = made
    halfway = int(marks[n // 2 // step])
    times, cpu, switched, faults, collected = (a[:n].tolist() for a in (times, cpu, switched, faults, collected))
    ref = {i: v for i, v in enumerate(ref[:n].tolist()) if not math.isnan(v)}  # run -> the reference after it
    quiet = sorted(t for t, k in zip(times, switched) if not k)
    cpu50 = statistics.median(cpu)
    slow = [i for i, c in enumerate(cpu) if c > 2 * cpu50]
    result = {"slow": len(slow), "slow_collected": sum(1 for i in slow if collected[i]),
              "slow_faulted": sum(1 for i in slow if faults[i]), "slow_switched": sum(1 for i in slow if switched[i]),
              "collections": collections[0]}
    if ref:
        samples = sorted(ref.values())
        ref50 = statistics.median(samples)
        # the reference just before or just after the run was slow too: the machine, not the run
        near = [i for i in slow if i in ref or i - 1 in ref]
        result["slow_with_ref"] = sum(1 for i in near if max(ref.get(i, 0), ref.get(i - 1, 0)) > 2 * ref50)
        result.update(ref_p50=ref50, ref_p99=_p99(samples), ref_ratio=_p99(samples) / ref50 if ref50 else math.inf,
                      ref_samples=len(samples), slow_near_ref=len(near))
    times.sort()
    cpu.sort()
    p50, p99, cpu99 = statistics.median(times), _p99(times), _p99(cpu)
    second_half = (after - halfway) / before
    return {"runs": n, "rss_before": before, "rss_after": after, "growth": (after - before) / before,
            "growth_second_half": second_half, "p50": p50,
            "p99": p99, "max": times[-1], "ratio": p99 / p50, "threads": threaded,
            "cpu_p50": cpu50, "cpu_p99": cpu99, "cpu_max": cpu[-1], "cpu_ratio": cpu99 / cpu50 if cpu50 else math.inf,
            "involuntary": involuntary, "runs_switched": n - len(quiet),
            "p99_not_switched": _p99(quiet) if quiet else math.nan, **result}


def _reference_work(program, inputs: list):
    """A fixed amount of vector floating-point work (numpy's SIMD multiply and add over two
    16 KiB float32 arrays that stay in L1, repeated; no allocation, no system call, no thread),
    sized to about the median CPU time of a run of ``program``. Timed after every run, it is the
    peer measured in the same run: the spread of work whose instructions never change is the
    machine's own (a vCPU that computes slower while a neighbour, here or on the host, shares
    its core, caches or memory: the guest sees no steal, switch or fault for it)."""
    a = np.linspace(-1, 1, 4096, dtype=np.float32)
    b, out = a[::-1].copy(), np.empty_like(a)

    def unit() -> None:
        np.multiply(a, b, out=out)
        np.add(out, a, out=out)

    def median_cpu(call, times: int) -> float:
        spent = []
        for i in range(times):
            c0 = time.process_time()
            call(i)
            spent.append(time.process_time() - c0)
        return statistics.median(spent)

    per_run = median_cpu(lambda i: program.run(inputs[i % len(inputs)]), max(15, len(inputs)))
    per_unit = median_cpu(lambda i: [unit() for _ in range(64)], 15) / 64
    repeats = range(max(1, round(per_run / per_unit)) if per_unit else 1)

    def work() -> None:
        for _ in repeats:
            unit()

    return work


def _p99(ascending: list) -> float:
    """The 99th percentile of sorted samples (nearest rank, as the wall-clock column always was)."""
    return ascending[min(len(ascending) - 1, int(0.99 * len(ascending)))]


def check_threads(program, inputs: list, want: list, threads: int, rounds: int, seconds: float) -> str:
    """``threads`` threads share ``rounds`` passes over ``inputs`` on one Program (each stops
    taking new runs after ``seconds``, when positive); every output must equal the single-threaded
    ``want`` bit for bit. Returns "ok (...)" or what went wrong."""
    from handoff import one_line

    if threads <= 0:
        return "ok (not checked)"
    jobs = [i % len(inputs) for i in range(rounds * len(inputs))]
    done, differed, errors = [0] * threads, [0] * threads, []
    stop = time.perf_counter() + seconds if seconds > 0 else float("inf")

    def work(k: int) -> None:
        try:
            for i in jobs[k::threads]:
                got = program.run(inputs[i])
                done[k] += 1
                if any(g.dtype != w.dtype or g.shape != w.shape or g.tobytes() != w.tobytes()
                       for g, w in zip(got, want[i])):
                    differed[k] += 1
                if time.perf_counter() > stop:
                    break
        except Exception as exc:  # reported, like a difference
            errors.append(one_line(exc))

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        return f"{len(errors)} thread(s) raised: {errors[0]}"
    if sum(differed):
        return f"{sum(differed)} of {sum(done)} runs differ from single-threaded runs"
    return f"ok ({threads} threads, {sum(done)} runs bit-exact)"


def program_for(model: str, backend: str, path: str) -> bool:
    """Partition ``zoo:model`` for ``backend`` (tvm taking what it declines) into ``path``, unless a
    program is there already (from an earlier soak with ``--programs``). Returns whether it was
    partitioned now."""
    import handoff

    if os.path.isfile(path):
        return False
    handoff.partition(f"zoo:{model}", backends=[backend]).write(path)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=0,
                        help="at most this long per program's timed loop (0: no bound)")
    parser.add_argument("--threads", type=int, default=8, help="threads of the thread check (0: no check)")
    parser.add_argument("--option", action="append", default=[], metavar="BACKEND.NAME=VALUE",
                        help="a runtime option for handoff.load (repeatable), e.g. xnnpack.threads=1")
    parser.add_argument("--thread-rounds", type=int, default=25,
                        help="passes over the --inputs inputs the threads share")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--inputs", type=int, default=16, help="distinct random inputs, used in turn")
    parser.add_argument("--models", default=None, help="comma-separated zoo models (default: all of them)")
    parser.add_argument("--backends", default="tvm,xnnpack,vulkan,qnn")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the fixed-work reference timed after every run (halves a loop's time)")
    parser.add_argument("--reference-every", type=int, default=1, metavar="K",
                        help="time the reference after every K-th run only (a long soak of a slow program: "
                             "1/K of the loop's time instead of half; its spread from runs/K samples)")
    parser.add_argument("--programs", metavar="DIR",
                        help="write the programs here and reuse one already there (default: a temporary folder)")
    args = parser.parse_args()

    import warnings

    import handoff
    from handoff import get_plugins, one_line

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation chatter
    plugins = get_plugins()
    backends = [b for b in args.backends.split(",") if b in plugins.backends and plugins.runtime_available(b)[0]]
    bound = f" (at most {args.seconds:g} s each)" if args.seconds > 0 else ""
    print(f"soak: {args.runs} runs{bound} after {args.warmup} warm-up runs per program; backends "
          f"{', '.join(backends)}; pid {os.getpid()}", flush=True)
    print(f"{'program':<30} {'runs':>6} {'RSS MB':>8} {'growth':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'p99/p50':>8}  threads")
    options: dict[str, dict[str, str]] = {}
    for text in args.option:
        key, _, value = text.partition("=")
        backend, _, name = key.partition(".")
        options.setdefault(backend, {})[name] = value
    missed = 0
    models = args.models.split(",") if args.models else list(handoff.zoo.BUILTIN)
    with tempfile.TemporaryDirectory(prefix="handoff-soak-") as work:
        folder = args.programs or work
        os.makedirs(folder, exist_ok=True)
        for model in models:
            for backend in backends:
                name = f"{model}/{backend}"
                path = os.path.join(folder, f"{model}-{backend}.hof")
                try:
                    program_for(model, backend, path)
                    r = soak(path, args.runs, args.seconds, args.warmup, args.inputs, args.threads,
                             args.thread_rounds if args.threads > 0 else 0,
                             {b: o for b, o in options.items() if b == backend}, not args.no_reference,
                             max(1, args.reference_every))
                except Exception as exc:  # report and go on: one backend's failure is a number too
                    print(f"{name:<30} failed: {one_line(exc)}", flush=True)
                    missed += 1
                    continue
                ok = r["growth"] < 0.01 and r["ratio"] <= 2 and r["threads"].startswith("ok")
                missed += not ok
                print(f"{name:<30} {r['runs']:>6} {r['rss_after'] / 2**20:>8.1f} {r['growth'] * 100:>7.2f}% "
                      f"{r['p50'] * 1e3:>8.3f} {r['p99'] * 1e3:>8.3f} {r['max'] * 1e3:>8.3f} {r['ratio']:>8.2f}  "
                      f"{r['threads']}; RSS growth over the second half of the runs "
                      f"{r['growth_second_half'] * 100:.2f}%{'' if ok else '  MISSED'}", flush=True)
                print(f"{'  cpu time, all threads':<30} {'':>6} {'':>8} {'':>8} {r['cpu_p50'] * 1e3:>8.3f} "
                      f"{r['cpu_p99'] * 1e3:>8.3f} {r['cpu_max'] * 1e3:>8.3f} {r['cpu_ratio']:>8.2f}  "
                      f"{r['involuntary']} involuntary switches, {r['runs_switched']} runs switched "
                      f"({r['runs_switched'] / r['runs'] * 100:.1f}%); wall p99 of the others "
                      f"{r['p99_not_switched'] * 1e3:.3f} ms", flush=True)
                same = f", {r['slow_with_ref']} next to a slow reference run" if "ref_p50" in r else ""
                if "ref_p50" in r and r["ref_samples"] < r["runs"]:
                    same += f" (of {r['slow_near_ref']} with a reference timed next to them)"
                print(f"{'  slow runs (cpu > 2 x p50)':<30} {r['slow']:>6} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8} "
                      f"{'':>8}  {r['slow_collected']} with a gc collection ({r['collections']} in all), "
                      f"{r['slow_faulted']} with page faults, {r['slow_switched']} switched out{same}", flush=True)
                if "ref_p50" in r:
                    after = "every run" if r["ref_samples"] >= r["runs"] else \
                        f"every {args.reference_every}th run ({r['ref_samples']} samples)"
                    print(f"{'  reference, fixed work':<30} {'':>6} {'':>8} {'':>8} {r['ref_p50'] * 1e3:>8.3f} "
                          f"{r['ref_p99'] * 1e3:>8.3f} {'':>8} {r['ref_ratio']:>8.2f}  cpu time of the same vector "
                          f"arithmetic after {after}: the machine's own spread", flush=True)
    print("targets: RSS growth < 1% after warm-up, p99 <= 2 x p50, threads bit-exact; the cpu line: a wall tail "
          "with cpu p99/p50 <= 2 is the scheduler's; a cpu tail that the fixed-work reference shares, in runs "
          "without a collection, fault or switch, is the machine's (load avg "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
