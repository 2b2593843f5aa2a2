"""Declares the built-in ``tvm`` backend. Imported by ``handoff.runtime``: no torch, no TVM here."""

from __future__ import annotations

from handoff import PLUGIN_API_VERSION, BackendSpec, Option, __version__, hookimpl

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
        api_version=PLUGIN_API_VERSION,  # ships with the core
        options={
            "target": Option("choice", "where the delegate runs: " + "; ".join(f"{k} = {v}" for k, v in TARGETS.items()),
                             default="host", choices=tuple(TARGETS)),
            "mcpu": Option("str", "LLVM CPU name to compile for (default: the detected CPU for target=host, none for "
                                  "aarch64); 'generic' makes a blob that runs on any CPU of the triple"),
            "tune": Option("int", "MetaSchedule trials per partition (0: untuned); records are kept in "
                                  "$HANDOFF_HOME/tuning/tvm and reused", default=0, min=0, compare=(0, 200)),
            "rpc": Option("str", "HOST:PORT/KEY: with tune, measure candidates on the devices of KEY in this TVM RPC "
                                 "tracker's pool (handoff serve --allow-tuning there) instead of this machine"),
            "tune_budget": Option("int", "minutes of MetaSchedule tuning per partition, largest operators first, "
                                         "round-robin in rounds of 16 candidates, checked before every round (0: "
                                         "none); records are kept in $HANDOFF_HOME/tuning/tvm and reused by "
                                         "every model with the same workload", default=0, min=0, max=24 * 60),
            "schedule": Option("choice", "schedules for what tuning did not cover: default = dlight's CPU rules "
                                         "and handoff's (parallel, vectorised); dlight = dlight's CPU rules only; "
                                         "none = TVM's pipeline as it is (naive loops)",
                               default="default", choices=("default", "dlight", "none")),
        },
    )]


@hookimpl(trylast=True)
def handoff_catalog() -> dict[str, dict]:
    return {"tvm": {
        "distribution": "handoff", "module": "handoff.tvm", "entry_point": "tvm", "device": "cpu",
        "platforms": ["linux-x86_64", "linux-aarch64", "macos-arm64", "android-arm64"],
        "compiler": {"name": "apache-tvm", "version": "0.27.0.post1"},
        "tvm_target": {"kind": "llvm"},
        "install": "pip install handoff (built into the core)",
        "description": "Apache TVM Relax, compiled ahead of time to a shared library; takes what no vendor backend claims",
    }}
