"""handoff's vulkan backend against eager PyTorch CUDA, on the same GPU.

Two modes, because the GPU machine has no TVM (and need not have handoff installed):

* ``--lower DIR`` (here, with TVM and torch): partitions each model with ``backends=["vulkan"]``
  and neither TVM fallback nor host ops, so the whole model is one Vulkan delegate, and writes
  ``DIR/NAME.hof`` (``DIR/NAME.TAG.hof`` for a variant lowered with ``--option`` and ``--tag``),
  ``DIR/NAME.npz`` (input and eager-CPU fp32 reference output) and ``DIR/NAME.pt`` (the model's
  state dict, for the CUDA peers).
* ``--run DIR`` (on the GPU machine): for each ``.hof`` in DIR, and in the same process
  * handoff: ``handoff.load`` with ``--option vulkan.timestamps=1``; end to end is
    ``program.run([x])`` with numpy in and out (input upload, one queue submission, one
    readback of the output: a submission and a map); device time is the timestamp-query span of
    the run's compute pass;
  * torch, the zoo model with the saved weights on ``cuda`` in fp32 with TF32 off, twice: eager,
    and ``torch.compile(mode="reduce-overhead")`` (inductor's kernels replayed as a CUDA graph: what
    a GPU user picks at batch 1, where eager is bound by kernel launches; ``--no-compile`` skips
    it); end to end is ``model(x.cuda()).cpu()`` (upload, run, read back); device time is CUDA
    events around ``model(x_gpu)``; first run is the compilation for ``torch.compile``;
  medians over ``--iters`` runs after ``--warmup``, the ratios handoff/peer, and each output's
  largest error relative to the reference. For handoff also the load's phases (device, shader
  modules, pipelines, buffers, bind groups) and the first run's host phases and GPU time.
* ``--run DIR --load-only``: only handoff's load and first run of each program, with their
  phases; run it twice, in two processes, to see what the driver's on-disk shader cache saves
  (``--load-threads N`` sets the ``vulkan.load_threads`` option, ``--first-submit 0,8`` runs each
  program with each ``vulkan.first_submit``; ``--profile-first-run N`` lists the N functions where
  each program's first run spent most, from cProfile). Without CUDA (e.g. lavapipe in CI) only handoff runs:
  its numbers are then a correctness run, not a measurement of anything.

On a GPU machine with Python 3.12, torch (CUDA) and numpy but no package index: put in ``.whl``
the wheels of wgpu 0.32.0, cffi, pycparser, rendercanvas and cryptography (handoff's signature
checks; add pluggy, PyYAML, rich and xxhash where the image lacks them) for Python 3.12
(``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
-d .whl wgpu==0.32.0 cffi pycparser rendercanvas cryptography``), and in ``.gl`` the Debian
packages libvulkan1 (the loader) and libegl1 + libglvnd0 (NVIDIA's Vulkan driver fails to
initialise without ``libEGL.so.1``: ``vk_icdNegotiateLoaderICDInterfaceVersion`` returns
VK_ERROR_INITIALIZATION_FAILED and the loader reports "Could not get 'vkCreateInstance'"). Then::

    for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    ln -sfn $PWD/core /tmp/site/handoff   # the core imports from source as ``handoff``
    export PYTHONPATH=/tmp/site:$PWD/plugins/vulkan
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    python3 benchmarks/vulkan_gpu.py --run DIR --json DIR/results.json

Torch's "GPU" time (CUDA events around an eager forward) includes the gaps in which the GPU
waits for the CPU to launch kernels; handoff's is the span of its one compute pass.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("mobilenet_v2", "small_transformer")


# -- --lower ------------------------------------------------------------------------------------
def lower(out: Path, models: list[str], options: dict[str, str], tag: str) -> None:
    import torch

    import handoff
    from handoff.zoo import random_inputs

    plugins = handoff.plugins.Plugins(autoload=False, extra=["handoff_vulkan.plugin"])
    handoff.plugins.set_plugins(plugins)
    out.mkdir(parents=True, exist_ok=True)
    zoo = plugins.zoo()
    for name in models:
        start = time.perf_counter()
        result = handoff.partition(f"zoo:{name}", backends=["vulkan"], fallback=False, aten=False,
                                   options={"vulkan": options} if options else None)
        seconds = time.perf_counter() - start
        stem = f"{name}.{tag}" if tag else name
        size = result.write(str(out / f"{stem}.hof"))
        model = zoo[name].build()
        (x,) = random_inputs(zoo[name].inputs, seed=7)
        with torch.no_grad():
            want = model(x)
        np.savez(out / f"{name}.npz", x=x.numpy(), want=want.numpy())
        torch.save(model.state_dict(), out / f"{name}.pt")
        delegate = result.assembled.manifest["delegates"][0]["metadata"]
        print(f"{name}: partitioned and lowered in {seconds:.1f}s -> {stem}.hof ({size / 1e6:.1f} MB, "
              f"{delegate['kernels']} kernels, {delegate['dispatches']} dispatches, "
              f"coverage {result.report.coverage('vulkan'):.0f}%)")


# -- --run --------------------------------------------------------------------------------------
def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def run_handoff(path: Path, x: np.ndarray, want: np.ndarray, args: argparse.Namespace,
                first_submit: str = "") -> dict[str, Any]:
    import handoff

    plugins = handoff.plugins.Plugins(autoload=False, extra=["handoff_vulkan.plugin"])
    options: dict[str, str] = {"timestamps": "1"}
    if args.adapter:
        options["adapter"] = args.adapter
    if args.load_threads:
        options["load_threads"] = args.load_threads
    if first_submit:
        options["first_submit"] = first_submit
    start = time.perf_counter()
    program = handoff.load(path, options={"vulkan": options}, plugins=plugins)
    load_s = time.perf_counter() - start
    with program:
        profile = cProfile.Profile() if args.profile_first_run else None
        first = time.perf_counter()
        if profile:
            profile.enable()
        (got,) = program.run([x])
        if profile:
            profile.disable()
        first_s = time.perf_counter() - first
        (stats,) = [d["stats"] for d in program.stats()["delegates"]]
        loaded = {"adapter": stats["adapter"], "load_ms": load_s * 1e3,
                  "load_phases_ms": {k: v * 1e3 for k, v in stats["load_seconds"].items()},
                  "first_run_ms": first_s * 1e3,
                  "first_run_phases_ms": {k: v * 1e3 for k, v in (stats["host_seconds"] or {}).items()},
                  "first_run_gpu_ms": (stats["gpu_seconds"] or 0.0) * 1e3,
                  "max_rel_err": _rel_err(got, want)}
        if profile:
            loaded["first_run_profile"] = _top_functions(profile, args.profile_first_run)
        if args.load_only:
            return loaded
        for _ in range(args.warmup):
            program.run([x])
        wall, gpu, phases = [], [], []
        for _ in range(args.iters):
            t = time.perf_counter()
            program.run([x])
            wall.append(time.perf_counter() - t)
            delegates = [d["stats"] for d in program.stats()["delegates"]]  # the last run's GPU time, host phases
            gpu.append(sum(d["gpu_seconds"] or 0.0 for d in delegates))
            phases.append(delegates[0]["host_seconds"] or {})
        adapter = delegates[0]["adapter"]
        meta = program.manifest["delegates"][0]["metadata"]
    return {**loaded, "adapter": adapter,
            "e2e_ms": _median_ms(wall), "e2e_p90_ms": float(np.percentile(wall, 90)) * 1e3,
            "gpu_ms": _median_ms(gpu),
            "host_phases_ms": {k: _median_ms([p[k] for p in phases if k in p]) for k in (phases[0] if phases else {})},
            "kernels": meta.get("kernels"), "dispatches": meta.get("dispatches")}


def _top_functions(profile: cProfile.Profile, count: int) -> list[dict[str, Any]]:
    """The ``count`` functions of a profiled run with the most cumulative time (where a fresh
    process's first run goes: cffi type parsing, buffer creation, pipeline waits)."""
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    rows = sorted(stats.items(), key=lambda item: item[1][3], reverse=True)[:count]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls,
             "own_ms": own * 1e3, "cumulative_ms": cum * 1e3}
            for (file, line, name), (calls, _, own, cum, _) in rows]


def run_torch(name: str, state: Path, x: np.ndarray, want: np.ndarray,
              args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The peers on CUDA, fp32 with TF32 off: eager, and unless ``--no-compile`` ``torch.compile``
    (inductor) with CUDA graphs (``mode="reduce-overhead"``), the pick of a GPU user at batch 1."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    from handoff.zoo import BUILTIN

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = BUILTIN[name].build()
    model.load_state_dict(torch.load(state, map_location="cpu"))
    model = model.eval().cuda()
    peers = {"torch_cuda": _time_torch(model, x, want, args)}
    if not args.no_compile:
        torch._dynamo.reset()
        peers["torch_compile"] = _time_torch(torch.compile(model, mode="reduce-overhead"), x, want, args)
    return peers


def _time_torch(model: Any, x: np.ndarray, want: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    xt = torch.from_numpy(x)
    with torch.no_grad():
        start = time.perf_counter()
        got = model(xt.cuda()).cpu().numpy()
        first_s = time.perf_counter() - start  # for torch.compile: the compilation
        for _ in range(args.warmup):
            model(xt.cuda()).cpu()
        wall = []
        for _ in range(args.iters):
            t = time.perf_counter()
            model(xt.cuda()).cpu()
            wall.append(time.perf_counter() - t)
        xg = xt.cuda()
        dev = []
        for _ in range(args.iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            model(xg)
            end.record()
            end.synchronize()
            dev.append(begin.elapsed_time(end) / 1e3)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "first_run_ms": first_s * 1e3,
            "e2e_ms": _median_ms(wall), "e2e_p90_ms": float(np.percentile(wall, 90)) * 1e3,
            "gpu_ms": _median_ms(dev), "max_rel_err": _rel_err(got, want)}


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))


def run(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every ``.hof`` of ``directory`` (``NAME.hof`` or ``NAME.TAG.hof``, a variant lowered with
    other options), then the torch peers once per model, all in this process."""
    results: dict[str, Any] = {"host": platform.node(), "python": sys.version.split()[0], "models": {}}
    present = {p.name.split(".")[0] for p in directory.glob("*.hof")}
    for name in [m for m in args.models.split(",") if m in present]:
        ref = np.load(directory / f"{name}.npz")
        x, want = ref["x"], ref["want"]
        entry: dict[str, Any] = {}
        for path in sorted(directory.glob(f"{name}*.hof")):
            variant = path.name[len(name):-len(".hof")].lstrip(".") or "default"
            if args.variants and variant not in args.variants.split(","):
                continue
            for first_submit in args.first_submit.split(",") if args.first_submit else [""]:
                label = f"{variant} first_submit={first_submit}" if first_submit else variant
                entry[f"handoff_vulkan[{label}]"] = ours = run_handoff(path, x, want, args, first_submit)
                _print_ours(name, label, ours)
                for row in ours.get("first_run_profile", []):
                    print(f"    {row['cumulative_ms']:8.2f} ms cumulative {row['own_ms']:8.2f} ms own "
                          f"{row['calls']:6d} calls  {row['function']}")
        if not args.load_only:
            if not args.no_torch:
                entry.update(run_torch(name, directory / f"{name}.pt", x, want, args))
            _print_peers(name, entry)
        results["models"][name] = entry
        if args.json:  # after each model: a later one that fails or runs out of time keeps these
            args.json.write_text(json.dumps(results, indent=2))
    return results


def _print_ours(name: str, variant: str, ours: dict[str, Any]) -> None:
    print(f"{name} [{variant}]: load {ours['load_ms']:.0f} ms on {ours['adapter']} (" +
          ", ".join(f"{k} {v:.0f}" for k, v in ours["load_phases_ms"].items()) +
          f"), first run {ours['first_run_ms']:.1f} ms (" +
          ", ".join(f"{k} {v:.1f}" for k, v in ours["first_run_phases_ms"].items()) +
          f"; GPU {ours['first_run_gpu_ms']:.1f}), max rel err {ours['max_rel_err']:.1e}")
    if "e2e_ms" not in ours:  # --load-only
        return
    print(f"{name} [{variant}]: handoff vulkan on {ours['adapter']}: load {ours['load_ms']:.0f} ms, first run "
          f"{ours['first_run_ms']:.1f} ms, end to end median {ours['e2e_ms']:.3f} ms (p90 {ours['e2e_p90_ms']:.3f}), "
          f"GPU {ours['gpu_ms']:.3f} ms, max rel err {ours['max_rel_err']:.1e}")
    print(f"{name} [{variant}]: run phases (median ms, {ours['dispatches']} dispatches of {ours['kernels']} "
          "kernels): " + ", ".join(f"{k} {v:.3f}" for k, v in ours["host_phases_ms"].items()))


def _print_peers(name: str, entry: dict[str, Any]) -> None:
    peers = {k: v for k, v in entry.items() if k.startswith("torch")}
    if not peers:
        print(f"{name}: no CUDA here: correctness run only, the timings above measure nothing of interest")
        return
    for peer, theirs in peers.items():
        print(f"{name}: {peer} {theirs['torch']} fp32 (TF32 off) on {theirs['device']}: first run "
              f"{theirs['first_run_ms']:.0f} ms, end to end median {theirs['e2e_ms']:.3f} ms "
              f"(p90 {theirs['e2e_p90_ms']:.3f}), GPU {theirs['gpu_ms']:.3f} ms, max rel err {theirs['max_rel_err']:.1e}")
    ratios = entry["ratios"] = {}
    for ours_key, ours in entry.items():
        if not ours_key.startswith("handoff"):
            continue
        for peer, theirs in peers.items():
            e2e, gpu = ours["e2e_ms"] / theirs["e2e_ms"], ours["gpu_ms"] / theirs["gpu_ms"]
            ratios[f"{ours_key}/{peer}"] = {"e2e": e2e, "gpu": gpu}
            print(f"{name}: {ours_key} / {peer}: end to end x{e2e:.2f}, GPU time x{gpu:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--lower", metavar="DIR", type=Path, help="partition and lower the models into DIR (needs TVM)")
    mode.add_argument("--run", metavar="DIR", type=Path, help="run the .hof files of DIR (needs wgpu, a Vulkan GPU)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"zoo models to lower or run, in this order (default {','.join(MODELS)})")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--adapter", default=os.environ.get("HANDOFF_VULKAN_ADAPTER", ""),
                        help="vulkan.adapter option: substring of the adapter to use")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch CUDA peers")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (compiles for minutes)")
    parser.add_argument("--load-only", action="store_true",
                        help="--run: only load each program and run it once, printing the load's phases (no peers); "
                             "run it again in a new process to see what the driver's shader cache saves")
    parser.add_argument("--variants", default="",
                        help="--run: only these variants (comma-separated; 'default' is NAME.hof), e.g. for --load-only")
    parser.add_argument("--first-submit", default="", metavar="N[,N...]",
                        help="--run: the vulkan.first_submit option; several values run each program once per value")
    parser.add_argument("--load-threads", default="", help="--run: the vulkan.load_threads option (default auto)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="--lower: a vulkan compile option (repeatable); the files are then NAME.TAG.hof")
    parser.add_argument("--profile-first-run", type=int, default=0, metavar="N",
                        help="--run: profile each program's first run (cProfile) and list its N costliest functions")
    parser.add_argument("--tag", default="", help="--lower: the variant's name in the file names (with --option)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.lower:
        options = dict(o.split("=", 1) for o in args.option)
        if options and not args.tag:
            parser.error("--option needs --tag (the variant's name in the file names)")
        lower(args.lower, [m.strip() for m in args.models.split(",") if m.strip()], options, args.tag)
        return 0
    results = run(args.run, args)
    return 0 if results["models"] else 1


if __name__ == "__main__":
    sys.exit(main())
