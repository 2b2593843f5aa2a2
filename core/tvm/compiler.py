"""The ahead-of-time half of the ``tvm`` backend.

A partition is imported with TVM's Relax importer for ``torch.export``
(:func:`tvm.relax.frontend.torch.from_exported_program`), optionally tuned with MetaSchedule, built
for an LLVM target with :func:`tvm.relax.build`, and exported as a shared library: the delegate
blob is that library's bytes. Capability is the importer's own converter table, so ``support``
claims exactly the ops the installed TVM can import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import tvm
from tvm import relax

from handoff import Compiler, Lowered, LoweringError, cache_dir, native

from .importer import decline_reason, import_partition
from .runtime import host_triple

#: The linker ``export_library`` needs for target=aarch64 (Debian: gcc-aarch64-linux-gnu).
AARCH64_CC = "aarch64-linux-gnu-gcc"


class TvmCompiler(Compiler):
    """Lowers partitions with Apache TVM (see :class:`handoff.Compiler`).

    Options (typed, see :mod:`handoff.tvm.plugin`): ``target`` (``host`` or ``aarch64``),
    ``mcpu`` (an LLVM CPU name for the target's triple), ``tune`` (MetaSchedule trials, ``0``).
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        target = options.get("target") or "host"
        self.tune = int(options.get("tune") or 0)

        if target == "host":
            self.triple, self.cc = host_triple(), None
        else:
            self.triple, self.cc = "aarch64-linux-gnu", AARCH64_CC
            if shutil.which(AARCH64_CC) is None:
                raise ValueError(f"target=aarch64 needs the cross linker {AARCH64_CC} on PATH: "
                                 f"apt-get install gcc-aarch64-linux-gnu")
            if self.tune:
                raise ValueError("option tune needs target=host: MetaSchedule measures candidates on this "
                                 "machine; tune on an aarch64 host with target=host instead")

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

            config["num-cores"] = cpu_count(logical=False)
        self.target_config = config
        self.target = tvm.target.Target(config)

    def support(self, ep: Any) -> Mapping[str, str | None]:
        return {n.name: decline_reason(n) for n in ep.graph.nodes if n.op == "call_function"}

    def cache_key(self) -> str:
        # The detected CPU and the TVM build decide the blob too, not only the options.
        return json.dumps({"tvm": tvm.__version__, "target": self.target_config}, sort_keys=True)

    def preprocess(self, ep: Any, name: str) -> Lowered:
        for node_name, reason in self.support(ep).items():
            if reason:
                raise LoweringError(f"{node_name}: {reason}", node=node_name)
        mod, inputs, outputs = import_partition(ep)

        if self.tune:
            mod = self._tune(mod)
        executable = relax.build(mod, target=self.target)
        with tempfile.TemporaryDirectory(prefix="handoff-tvm-") as tmp:
            path = os.path.join(tmp, "delegate.so")
            executable.export_library(path, **({"cc": self.cc} if self.cc else {}))
            blob = Path(path).read_bytes()
        native.approve(native.sha256(blob))  # built here: this process may load it
        return Lowered(blob, {
            "compiler": "apache-tvm",
            "tvm_version": tvm.__version__,
            "target": self.target_config,
            "triple": self.triple,
            "mcpu": self.mcpu,
            "tune_trials": self.tune,
            "entry": "main",
            "num_inputs": len(inputs),
            "num_outputs": len(outputs),
            "inputs": inputs,
            "outputs": outputs,
        })

    # -- MetaSchedule ----------------------------------------------------------------------------
    @property
    def tuning_dir(self) -> Path:
        """The tuning database of this target, shared by every model and run:
        ``$HANDOFF_HOME/tuning/tvm/<tvm version>-<triple>-<mcpu>-<hash of the target>``."""
        digest = hashlib.sha256(json.dumps(self.target_config, sort_keys=True).encode()).hexdigest()[:10]
        return cache_dir(f"tuning/tvm/{tvm.__version__}-{self.triple}-{self.mcpu or 'generic'}-{digest}")

    def _tune(self, mod: Any) -> Any:
        """Legalise and fuse ``mod`` as the ``static_shape_tuning`` pipeline does, tune only the
        tasks the database has no record for (``self.tune`` trials in all, shared evenly), then
        apply the best record of every task. A model whose tasks are all in the database costs no
        trials; when there are more tasks than trials, the tasks left over are tuned by later runs."""
        from tvm.s_tir import meta_schedule as ms

        with self.target:
            mod = tvm.transform.Sequential([
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.get_pipeline("zero"),
            ])(mod)
        database = ms.database.JSONDatabase(work_dir=str(self.tuning_dir))
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
            logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, work_dir=work_dir)
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, database=database,
                          max_trials_global=self.tune, max_trials_per_task=per_task,
                          num_trials_per_iter=min(64, per_task),
                          builder=ms.builder.LocalBuilder(f_build=_build_candidate))
        with self.target, database:
            return relax.transform.MetaScheduleApplyDatabase()(mod)


def _host_cpu(triple: str) -> str | None:
    """LLVM's name for this machine's CPU, when TVM exposes it and LLVM accepts it for ``triple``
    (``mcpu: native`` is refused by the wheel's LLVM, so the CPU has to be named)."""
    try:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return cpu if cpu and cpu != "generic" and tvm.target.codegen.llvm_is_valid_cpu(cpu, triple) else None
    except Exception:  # a TVM built without LLVM cannot say; compile for the triple's baseline
        return None
