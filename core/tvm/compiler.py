"""The ahead-of-time half of the ``tvm`` backend.

A partition is imported with TVM's Relax importer for ``torch.export``
(:func:`tvm.relax.frontend.torch.from_exported_program`), optionally tuned with MetaSchedule, built
for an LLVM target with :func:`tvm.relax.build` (TVM's CPU pipeline with the default schedules of
:mod:`handoff.tvm.schedules` for whatever tuning did not cover), and exported as a shared library:
the delegate blob is that library's bytes. Capability is the importer's own converter table, so ``support``
claims exactly the ops the installed TVM can import.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import linecache
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tvm
from tvm import relax

from handoff import (Compiler, Lowered, LoweringError, cache_dir, is_quantized, native, quiet_native, temp_dir,
                     write_atomic)

from .importer import INT8_COMPUTE, decline_reason, import_partition
from .runtime import host_triple
from .schedules import default_schedule

#: The linker ``export_library`` needs for target=aarch64 (Debian: gcc-aarch64-linux-gnu).
AARCH64_CC = "aarch64-linux-gnu-gcc"


class TvmCompiler(Compiler):
    """Lowers partitions with Apache TVM (see :class:`handoff.Compiler`).

    Options (typed, see :mod:`handoff.tvm.plugin`): ``target`` (``host`` or ``aarch64``),
    ``mcpu`` (an LLVM CPU name for the target's triple), ``tune`` (MetaSchedule trials, ``0``),
    ``rpc`` (``HOST:PORT/KEY``: measure tuning candidates on the devices of ``KEY`` in that TVM RPC
    tracker's pool instead of this machine).
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        target = options.get("target") or "host"
        self.tune = int(options.get("tune") or 0)
        self.tune_budget = float(options.get("tune_budget") or 0)  # minutes
        if self.tune_budget and not self.tune:
            self.tune = TRIALS_PER_MINUTE_CAP * max(1, math.ceil(self.tune_budget))
        self.rpc = _parse_rpc(options.get("rpc"))
        if self.rpc and not self.tune:
            raise ValueError("option rpc measures tuning candidates on remote devices: give tune=N (--tune N) or "
                             "tune_budget=MINUTES (--tune-budget) too")
        self.schedule = options.get("schedule") or "default"
        #: what the last tuning did: tasks tuned, rounds run and whether the budget ended it
        self.tuning: dict[str, Any] = {}

        if target == "host":
            self.triple, self.cc = host_triple(), None
        else:
            self.triple, self.cc = "aarch64-linux-gnu", AARCH64_CC
            if shutil.which(AARCH64_CC) is None:
                raise ValueError(f"target=aarch64 needs the cross linker {AARCH64_CC} on PATH: "
                                 f"apt-get install gcc-aarch64-linux-gnu")
            if self.tune and not self.rpc:
                raise ValueError("option tune with target=aarch64 needs aarch64 devices to measure on: add --rpc "
                                 "HOST:PORT --key KEY (handoff serve --allow-tuning on the boards), or tune on an "
                                 "aarch64 host with target=host")

        mcpu = options.get("mcpu")
        if mcpu is None:
            mcpu = _host_cpu(self.triple) if target == "host" else None
        elif not tvm.target.codegen.llvm_is_valid_cpu(mcpu, self.triple):
            cpus = tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": self.triple}))
            raise ValueError(f"option mcpu={mcpu!r} is not a CPU LLVM knows for {self.triple}; "
                             f"valid values: {', '.join(sorted(cpus))}")
        self.mcpu = mcpu

        config: dict[str, Any] = {"kind": "llvm", "mtriple": self.triple}
        if mcpu:
            config["mcpu"] = mcpu
        if target == "aarch64":
            config["mattr"] = ["+neon"]
        if self.tune:
            # MetaSchedule requires it (parallel schedule rules); it keys the tuning database too.
            from tvm.s_tir.meta_schedule.utils import cpu_count

            if self.rpc:  # the device's cores: they shape the schedules and key the database
                from handoff.remote import remote_info

                device = remote_info(self.rpc[0], self.rpc[1])
                config["num-cores"] = int(device.get("cpu_cores") or device["cpu_count"])
            else:
                config["num-cores"] = cpu_count(logical=False)
        self.target_config = config
        self.target = tvm.target.Target(config)

    def support(self, ep: Any) -> Mapping[str, str | None]:
        return {n.name: decline_reason(n) for n in ep.graph.nodes if n.op == "call_function"}

    def quantizer(self, scheme: str) -> Any:
        """A symmetric per-channel default (:mod:`handoff.tvm.quantizer`): TVM imports every
        quantize/dequantize op, so any PT2E scheme lowers."""
        from .quantizer import SymmetricQuantizer

        return SymmetricQuantizer()

    def cache_key(self) -> str:
        # The detected CPU and the TVM build decide the blob too, not only the options.
        return json.dumps({"tvm": tvm.__version__, "target": self.target_config}, sort_keys=True)

    def preprocess(self, ep: Any, name: str) -> Lowered:
        for node_name, reason in self.support(ep).items():
            if reason:
                raise LoweringError(f"{node_name}: {reason}", node=node_name)
        mod, inputs, outputs = import_partition(ep)

        executable = self._keep_faster(mod, self._tune(mod), inputs) if self.tune else self._build(mod)
        # The linker's objects (lib0.o, devc.o) go into the same directory, not a tempdir of TVM's
        # own, so a killed partition leaves nothing that the next one does not remove.
        with temp_dir("tvm") as tmp:
            path = tmp / "delegate.so"
            executable.export_library(str(path), workspace_dir=str(tmp), **({"cc": self.cc} if self.cc else {}))
            blob = path.read_bytes()
        native.approve(native.sha256(blob))  # built here: this process may load it
        return Lowered(blob, {
            "compiler": "apache-tvm",
            "tvm_version": tvm.__version__,
            "target": self.target_config,
            "triple": self.triple,
            "mcpu": self.mcpu,
            "tune_trials": self.tune,
            "tune_budget_minutes": self.tune_budget,
            **({"tuning": self.tuning} if self.tune else {}),
            "schedule": self.schedule,
            "entry": "main",
            "num_inputs": len(inputs),
            "num_outputs": len(outputs),
            "inputs": inputs,
            "outputs": outputs,
            **({"int8_compute": INT8_COMPUTE} if is_quantized(ep) else {}),
        })

    # -- MetaSchedule ----------------------------------------------------------------------------
    @property
    def tuning_dir(self) -> Path:
        """The tuning database of this target, shared by every model and run:
        ``$HANDOFF_HOME/tuning/tvm/<tvm version>-<triple>-<mcpu>-<hash of the target>``."""
        digest = hashlib.sha256(json.dumps(self.target_config, sort_keys=True).encode()).hexdigest()[:10]
        return cache_dir(f"tuning/tvm/{tvm.__version__}-{self.triple}-{self.mcpu or 'generic'}-{digest}")

    def _tune(self, mod: Any) -> Any:
        """Legalise and fuse ``mod`` with the very passes of the untuned build (:func:`_legalize`),
        tune only the tasks the database has no record for (``self.tune`` trials in all, shared
        evenly), then apply the best record of every task. A model whose tasks are all in the
        database costs no trials; when there are more tasks than trials, the tasks left over are
        tuned by later runs. The build then skips legalisation (``_pipeline(legalized=True)``).

        Why the same passes: the functions without a record keep the default schedule, and the
        default schedule is written for the functions the build's own fusion makes. Preparing the
        module as TVM's ``static_shape_tuning`` does (``DecomposeOpsForInference`` + the ``zero``
        pipeline) fused batch norms into the convolutions, which dlight's reduction rule then
        scheduled with the padding copied per output element: MobileNetV2 tuned for 5 minutes ran
        727 ms per call instead of 230 ms untuned, 690 ms of it in functions that had no record."""
        from tvm.s_tir import meta_schedule as ms

        from . import budget

        _import_tensor_intrinsics()
        self.tuning = {"tasks": 0}
        database = ms.database.JSONDatabase(work_dir=str(self.tuning_dir))
        with quiet_native():  # TOPI's fast-mode take warning again, as in the untuned build
            mod = _legalize(self.target, self.schedule)(mod)
            tasks = [t for t in ms.relax_integration.extract_tasks(mod, self.target)
                     if not t.mod.attrs.get("tirx.is_scheduled", False)]
        todo = [t for t in tasks if database.query_tuning_record(t.dispatched[0], self.target, "main") is None]
        if todo:

            def _build_candidate(mod: Any, target: Any, _params: Any) -> Any:
                """MetaSchedule's ``default_build`` minus ``import tvm.s_tir.tensor_intrin``, which
                takes ~15 s (10 s of CUDA intrinsics) in every fresh builder worker of every round,
                past the builder's 30 s timeout on a small machine; building a scheduled (already
                tensorized) PrimFunc needs no intrinsic registry. Nested so that cloudpickle ships
                it by value: the workers need not import handoff (nor torch)."""
                from tvm.driver import build
                from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

                return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

            # Per-task cap: the gradient scheduler would otherwise spend a small budget on the
            # first tasks again and again, and leave the others without records.
            per_task = max(1, math.ceil(self.tune / len(todo)))
            work_dir = str(self.tuning_dir)
            # MetaSchedule logs every round to stdout at its logger's level: keep the console to
            # warnings; the full log goes to logs/ next to the database.
            ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
            ms_logger.setLevel(logging.WARNING)
            # A tuning earlier in this process leaves an unnamed handler on this logger, which
            # MetaSchedule's logging config cannot name (AttributeError on None): drop such handlers.
            for handler in [h for h in ms_logger.handlers if h.get_name() is None]:
                ms_logger.removeHandler(handler)
            # A time budget: rounds of a few candidates, the largest tasks (most FLOPs, they dominate
            # the latency) first, round-robin, until the budget is spent (checked before every round,
            # handoff.tvm.budget); tasks left without a record keep the default schedule.
            scheduler: Any = "gradient"
            strategy: Any = "evolutionary"
            per_round = min(64, per_task)
            if self.tune_budget:
                order = sorted(range(len(todo)), key=lambda k: -float(todo[k].weight) * _flops(todo[k]))
                scheduler = budget.BudgetScheduler(order, budget.clock() + self.tune_budget * 60)
                strategy, per_round = budget.search_strategy(), min(budget.TRIALS_PER_ROUND, per_task)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, work_dir=work_dir,
                                                                                      strategy=strategy)
            builder = ms.builder.LocalBuilder(f_build=_build_candidate,
                                              **({"f_export": _export_candidate(self.cc)} if self.rpc else {}))
            runner = {"runner": self._rpc_runner()} if self.rpc else {}
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, database=database,
                          max_trials_global=per_task * len(todo), max_trials_per_task=per_task,
                          num_trials_per_iter=per_round, builder=builder, task_scheduler=scheduler, **runner)
            self.tuning = {"tasks": len(todo), "rounds": getattr(scheduler, "rounds", None),
                           "stopped_by_budget": getattr(scheduler, "stopped_by_budget", False)}
        with self.target:  # the default schedules read it
            faster = self._faster_records(database, tasks)
        with self.target, faster, quiet_native():
            return relax.transform.MetaScheduleApplyDatabase()(mod)

    def _faster_records(self, database: Any, tasks: list[Any]) -> Any:
        """A database of the records of ``tasks`` whose tuned function runs faster on this machine
        than the same function with the default schedule (:func:`_faster_functions`); the others
        keep the default schedule. A record is only the fastest of the candidates MetaSchedule
        measured, and a short search often finds none as fast as the default schedule: MobileNetV2
        tuned for 5 minutes ran slower as a whole (21.95 vs 20.32 ms) though some of its tuned
        functions beat the default. Each function is built both ways and timed alone, interleaved,
        on random buffers; the decisions and medians go to ``self.tuning["functions"]``. A remote
        or cross target (``rpc``) cannot be timed here: every record is kept. Functions timed alone
        run with their weights in cache, so the choices need not add up to the program's time;
        :meth:`_keep_faster` still compares the whole programs. Both medians of a function timed
        by an earlier run (the same record, default schedule and target) are reused
        (:class:`_Timings`; ``timed_before`` counts them)."""
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        records = {t.task_name: r for t in tasks
                   if (r := database.query_tuning_record(t.dispatched[0], self.target, "main")) is not None}
        untimed = sorted(records) if self.rpc or self.cc else []
        medians = {}
        timings = _Timings(self.tuning_dir / _Timings.NAME)
        for task in tasks:
            if task.task_name not in records or task.task_name in untimed:
                continue
            workload = task.dispatched[0]
            tuned = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(
                database.query_schedule(workload, self.target, "main").mod)
            # a copy: dlight's pass writes into the module it is given, here the task's workload,
            # which is the very object of a record committed by this run's tuning
            default = (workload if self.schedule == "none"
                       else default_schedule(self.schedule)(tvm.IRModule(dict(workload.functions_items()))))
            key = timings.key(tuned, default, self.target)
            timed = timings.get(key)
            if timed is None:
                with quiet_native():
                    timed = _function_ms([tuned, default], self.target)
                timings.put(key, timed)
            if timed is None:  # symbolic shapes: no buffers to time it on
                untimed.append(task.task_name)
            else:
                medians[task.task_name] = timed
        timings.save()
        keep = _faster_functions(medians) + untimed
        faster = ms.database.MemoryDatabase()
        for name in keep:
            record = records[name]
            faster.commit_tuning_record(ms.database.TuningRecord(
                record.trace, faster.commit_workload(record.workload.mod), record.run_secs, record.target,
                record.args_info))
        self.tuning["functions"] = {
            "records_kept": len(keep), "records_dropped": len(records) - len(keep), "untimed": len(untimed),
            "timed_before": timings.hits,
            "medians_ms": {name: {"tuned": round(t, 6), "default": round(d, 6),
                                  "kept": "tuned" if name in keep else "default"}
                           for name, (t, d) in sorted(medians.items())}}
        return faster

    def _build(self, mod: Any, legalized: bool = False) -> Any:
        """``mod`` built for this target: the default schedules, or a tuned module (``legalized``)."""
        with quiet_native():  # TOPI warns on every take in fast mode (embedding, select), in bounds or not
            return relax.build(mod, target=self.target,
                               relax_pipeline=_pipeline(self.target, self.schedule, legalized=legalized))

    def _keep_faster(self, mod: Any, tuned_mod: Any, inputs: list[dict[str, Any]]) -> Any:
        """The build of ``tuned_mod`` when it runs faster than that of ``mod`` (the default
        schedules) on this machine, else the untuned build: a few rounds of tuning can pick records
        whose whole-model time is worse than the default schedule's, and a tuned program must never
        be the slower one. Both are timed here, interleaved, on random inputs; the decision and both
        medians go to ``self.tuning`` (and the delegate's metadata, ``handoff inspect``). With a
        remote target (``rpc``) or symbolic input shapes this machine cannot time them: the tuned
        build is kept."""
        if self.rpc or self.cc or any(not all(isinstance(d, int) for d in (i["shape"] or ["?"])) for i in inputs):
            self.tuning["kept"] = "tuned (not timed on this machine)"
            return self._build(tuned_mod, legalized=True)
        untuned_ms, tuned_ms = _median_ms([self._build(mod), self._build(tuned_mod, legalized=True)], inputs)
        faster = tuned_ms < untuned_ms
        self.tuning.update({"kept": "tuned" if faster else "untuned (default schedules were faster)",
                            "tuned_ms": round(tuned_ms, 3), "untuned_ms": round(untuned_ms, 3)})
        # Built again rather than the timed one exported: a VM that has run an executable leaves an
        # empty memory scope per constant in it (TVM 0.27's vm.cc indexes exec->memory_scopes with
        # [], which inserts), and the exported program then logs "Scope Loaded:" for each on every
        # load (106 lines for a tuned MobileNetV2), and "Scope Saving:" on export.
        return self._build(tuned_mod, legalized=True) if faster else self._build(mod)

    def _rpc_runner(self) -> Any:
        """MetaSchedule's RPC runner on the pool of ``self.rpc``: one worker per device of the key,
        so N devices measure N candidates at once (the tracker hands each session a free one)."""
        from tvm.s_tir import meta_schedule as ms

        from handoff.remote import Tracker, parse_address

        (host, port), key = parse_address(self.rpc[0]), self.rpc[1]
        with Tracker(self.rpc[0]) as tracker:
            servers = tracker.servers(key)
        return ms.runner.RPCRunner(ms.runner.RPCConfig(host, port, key, session_timeout_sec=60),
                                   max_workers=servers)


def _parse_rpc(text: str | None) -> tuple[str, str] | None:
    """``HOST:PORT/KEY`` -> ``("HOST:PORT", "KEY")``."""
    if not text:
        return None
    address, slash, key = str(text).rpartition("/")
    if not (slash and address and key):
        raise ValueError(f"option rpc={text!r}: expected HOST:PORT/KEY (a TVM RPC tracker and a device key), e.g. "
                         f"127.0.0.1:9190/rk3588")
    return address, key


def _export_candidate(cc: str | None) -> Any:
    """MetaSchedule's export for remote measurement: a linked shared library, so the device
    links nothing (its ``handoff serve`` loads it as it is); nested for cloudpickle, as above."""

    def export(mod: Any) -> str:
        import os
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="handoff-tune-"), "candidate.so")
        mod.export_library(path, **({"cc": cc} if cc else {}))
        return path

    return export


#: with ``tune_budget`` alone, trials are capped at this many per minute of budget (the budget,
#: not the cap, normally ends tuning: 2 cores measure about 0.3 candidates a second here)
TRIALS_PER_MINUTE_CAP = 64


def _import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's ``TuneContext`` does, for its schedule
    rules) with a cheap ``inspect.stack``. TVMScript's parser calls ``inspect.stack()`` for each of
    the hundreds of intrinsics it parses, and that calls ``inspect.getmodule`` per frame, a scan of
    ``sys.modules``: with torch imported (thousands of modules) the import took over 5 minutes on
    2 busy cores, before the first tuning round. The parser reads a frame's locals and the line of
    its caller's caller, which this stack gives it; it is replaced only during this import, made
    once per process, from the thread that tunes."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno)
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                            [line] if line else None, 0 if line else None))
            frame = frame.f_back
        return frames

    real, inspect.stack = inspect.stack, stack  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = real  # type: ignore[assignment]


def _median_ms(executables: list[Any], inputs: list[dict[str, Any]], rounds: int = 5) -> list[float]:
    """Median milliseconds per call of each executable's ``main`` on one set of random inputs,
    the executables timed in turn, round after round (a busy machine slows them alike)."""
    args = _random_args([(i["shape"], i["dtype"]) for i in inputs])
    timers = []
    for executable in executables:
        vm = relax.VirtualMachine(executable, tvm.cpu())
        vm["main"](*args)  # warm-up: first-touch of the constants and workspaces
        timers.append(vm.time_evaluator("main", tvm.cpu(), number=1, repeat=1))
    return _interleaved_ms(timers, args, rounds)


def _random_args(shapes: list[tuple[Any, Any]]) -> list[Any]:
    """Tensors of ``(shape, dtype)``: random floats, zeros for integers (an index is in bounds)."""
    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.standard_normal(shape).astype(str(dtype)) if "float" in str(dtype)
                               else np.zeros(shape, str(dtype)), tvm.cpu()) for shape, dtype in shapes]


def _interleaved_ms(timers: list[Any], args: list[Any], rounds: int) -> list[float]:
    """Each ``time_evaluator``'s median milliseconds, the timers run in turn, round after round."""
    times: list[list[float]] = [[] for _ in timers]
    for _ in range(rounds):
        for timer, seen in zip(timers, times):
            seen.append(timer(*args).median * 1e3)
    return [float(np.median(seen)) for seen in times]


def _faster_functions(medians: Mapping[str, tuple[float, float]]) -> list[str]:
    """The functions whose tuned median beats their default schedule's, from ``{name: (tuned ms,
    default ms)}``; a tie keeps the default schedule (tuning has to pay for itself)."""
    return sorted(name for name, (tuned, default) in medians.items() if tuned < default)


def _function_ms(mods: list[Any], target: Any, rounds: int = 7) -> list[float] | None:
    """Median milliseconds of each PrimFunc module's ``main``, built for ``target`` and timed in
    turn, round after round, on one set of random buffers of its arguments' shapes; ``None`` when
    the shapes are symbolic."""
    from tvm.s_tir import meta_schedule as ms

    shapes = [(list(a.shape), a.dtype) for a in ms.arg_info.ArgInfo.from_prim_func(mods[0]["main"])]
    if not all(isinstance(d, int) for shape, _ in shapes for d in shape):
        return None
    args = _random_args(shapes)
    timers = []
    for mod in mods:
        lib = tvm.compile(mod, target=target).jit()
        lib["main"](*args)  # warm-up
        timers.append(lib.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=10))
    return _interleaved_ms(timers, args, rounds)


class _Timings:
    """The per-function guard's medians, remembered next to the tuning database they judge
    (``timings.json``), so that a later run whose tasks all have records does not build and time
    each function twice again (two builds and ~0.2 s of timing per function). Keyed by the exact
    content of both modules (TVM's JSON form, SHA-256) and the target: a new record, another
    default schedule (a handoff or TVM update) or another target is timed afresh. The file only
    chooses between two schedules of the same function, both correct, so a damaged or edited one
    costs speed at worst, never a wrong result: unreadable, it is timed again and rewritten."""

    NAME = "timings.json"
    LIMIT = 16384  # entries kept (~2 MB); past it only the newest run's stay (timings are cheap to redo)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self._read()
        self.new: dict[str, list[float]] = {}
        self.hits = 0

    def _read(self) -> dict[str, Any]:
        try:
            entries = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    @staticmethod
    def key(tuned: Any, default: Any, target: Any) -> str:
        parts = [tvm.ir.save_json(tuned), tvm.ir.save_json(default), str(target)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(self, key: str) -> list[float] | None:
        """Both medians (ms) timed for ``key`` before, or ``None`` (never timed, or unusable)."""
        found = self.entries.get(key)
        if (isinstance(found, list) and len(found) == 2
                and all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in found)):
            self.hits += 1
            return found
        return None

    def put(self, key: str, medians: list[float] | None) -> None:
        if medians is not None:
            self.new[key] = [float(t) for t in medians]

    def save(self) -> None:
        """Add this run's medians to the file (read again first, so two runs saving at once lose
        at most each other's newest entries), written atomically: a reader sees the old or the
        new file."""
        if not self.new:
            return
        entries = {**self._read(), **self.new}
        if len(entries) > self.LIMIT:
            entries = dict(self.new)
        write_atomic(self.path, json.dumps(entries).encode())


def _flops(task: Any) -> float:
    """Estimated floating-point operations of a task's workload (0 when TVM cannot say)."""
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:
        return 0.0


def _legalize(target: Any, schedule: str = "default") -> Any:
    """The first half of TVM's Relax pipeline for CPU targets (``relax.backend.cpu_generic``):
    library dispatch, legalisation to PrimFuncs and fusion; for scheduled builds (``schedule`` not
    ``none``) batch norm is folded into the weights of a bias-free convolution before it, or else
    decomposed into the scale and shift it is at inference, and its constants folded, so FuseOps
    fuses it, and the activation after it (ReLU6), into the convolution (one pass over the output
    instead of kernels of their own that read and write the whole activation again).
    Tuning runs it before extracting its tasks, so tuned and untuned builds are made of the same
    functions."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    # FoldBatchnormToConv2D scales the conv's weights (bias-free conv + batch norm: MobileNet) so
    # that only a bias add is left; CanonicalizeBindings drops the (output, mean, var) tuple that
    # decomposition leaves, which otherwise stops FuseOps before the activation (ReLU6 ran as a
    # kernel of its own, one more pass over the activation).
    inference = [] if schedule == "none" else [relax.transform.FoldBatchnormToConv2D(),
                                               relax.transform.DecomposeOpsForInference(),
                                               relax.transform.CanonicalizeBindings(),
                                               relax.transform.FoldConstant()]

    @tvm.transform.module_pass(opt_level=0)
    def _run(mod: Any, _ctx: Any) -> Any:
        with target:
            return tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + inference + cpu.legalize_passes(target))(mod)

    return _run


def _pipeline(target: Any, schedule: str, legalized: bool = False) -> Any:
    """TVM's Relax pipeline for CPU targets (``relax.backend.cpu_generic``) with the default
    schedules (:mod:`handoff.tvm.schedules`) between fusion and lowering; ``legalized``: the
    module went through :func:`_legalize` already (tuning). ``schedule``: ``default`` (handoff's
    rules and dlight's CPU rules), ``dlight`` (dlight's CPU rules only), ``none`` (TVM's pipeline
    as it is: naive loop nests)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    scheduling = [] if schedule == "none" else [default_schedule(schedule)]
    legalize = [] if legalized else [_legalize(target, schedule)]

    @tvm.transform.module_pass(opt_level=0)
    def _run(mod: Any, _ctx: Any) -> Any:
        with target:
            return tvm.transform.Sequential(
                legalize + scheduling + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

    return _run


def _host_cpu(triple: str) -> str | None:
    """LLVM's name for this machine's CPU, when TVM exposes it and LLVM accepts it for ``triple``
    (``mcpu: native`` is refused by the wheel's LLVM, so the CPU has to be named)."""
    try:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return cpu if cpu and cpu != "generic" and tvm.target.codegen.llvm_is_valid_cpu(cpu, triple) else None
    except Exception:  # a TVM built without LLVM cannot say; compile for the triple's baseline
        return None
