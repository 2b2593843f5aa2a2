"""Declares the built-in ``tvm`` backend. Imported by ``handoff.runtime``: no torch, no TVM here."""

from __future__ import annotations

from handoff import __version__
from handoff.backend import BackendSpec
from handoff.hookspecs import hookimpl

#: ``--option tvm.target=NAME`` -> what it means (the compiler turns these into TVM targets).
TARGETS = {
    "host": "this machine: its triple and the CPU LLVM detects",
    "aarch64": "64-bit Arm Linux with NEON, cross-linked with aarch64-linux-gnu-gcc",
}


@hookimpl(trylast=True)
def handoff_backends() -> list[BackendSpec]:
    # trylast: TVM takes almost every op, so it is the catch-all after the specialised backends.
    return [BackendSpec(
        id="tvm",
        version=__version__,  # ships with the core
        device="cpu",
        compiler="handoff.tvm.compiler:TvmCompiler",
        runtime="handoff.tvm.runtime:TvmRuntime",
        description="Apache TVM 0.27 (Relax, LLVM): compiles to a native library for the host or aarch64",
        options={
            "target": "where the delegate runs: " + "; ".join(f"{k} = {v}" for k, v in TARGETS.items())
                      + " (default host)",
            "mcpu": "LLVM CPU name to compile for (default: the detected CPU for target=host, none for "
                    "aarch64); 'generic' makes a blob that runs on any CPU of the triple",
            "tune": "MetaSchedule trials per partition (default 0: untuned); records are kept in "
                    "$HANDOFF_HOME/tuning/tvm and reused",
        },
    )]
