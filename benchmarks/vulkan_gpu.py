"""handoff's vulkan backend against eager PyTorch CUDA, on the same GPU.

Two modes, because the GPU machine has no TVM (and need not have handoff installed):

* ``--lower DIR`` (here, with TVM and torch): partitions each model with ``backends=["vulkan"]``
  and neither TVM fallback nor host ops, so the whole model is one Vulkan delegate, and writes
  ``DIR/NAME.hof``, ``DIR/NAME.npz`` (input and eager-CPU fp32 reference output) and
  ``DIR/NAME.pt`` (the model's state dict, for the CUDA baseline).
* ``--run DIR`` (on the GPU machine): for each ``.hof`` in DIR, and in the same process
  * handoff: ``handoff.load`` with ``--option vulkan.timestamps=1``; end to end is
    ``program.run([x])`` with numpy in and out (input upload, one queue submission, one
    readback of the output: a submission and a map); device time is the timestamp-query span of
    the run's compute pass;
  * torch: the zoo model with the saved weights on ``cuda`` in fp32 with TF32 off; end to end is
    ``model(x.cuda()).cpu()`` (upload, run, read back); device time is CUDA events around
    ``model(x_gpu)``;
  medians over ``--iters`` runs after ``--warmup``, the ratios handoff/torch, and each output's
  largest error relative to the reference. Without CUDA (e.g. lavapipe in CI) only handoff runs:
  its numbers are then a correctness run, not a measurement of anything.

On a GPU machine with Python 3.12, torch (CUDA) and numpy but no package index: put in ``.whl``
the wheels of wgpu 0.32.0, cffi, pycparser, rendercanvas, pluggy and PyYAML for Python 3.12
(``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
-d .whl wgpu==0.32.0 cffi pycparser rendercanvas pluggy PyYAML``), and in ``.gl`` the Debian
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
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("mobilenet_v2", "small_transformer")


# -- --lower ------------------------------------------------------------------------------------
def lower(out: Path, models: list[str]) -> None:
    import torch

    import handoff
    from handoff.zoo import random_inputs

    plugins = handoff.plugins.Plugins(autoload=False, extra=["handoff_vulkan.plugin"])
    handoff.plugins.set_plugins(plugins)
    out.mkdir(parents=True, exist_ok=True)
    zoo = plugins.zoo()
    for name in models:
        start = time.perf_counter()
        result = handoff.partition(f"zoo:{name}", backends=["vulkan"], fallback=False, aten=False)
        seconds = time.perf_counter() - start
        size = result.write(str(out / f"{name}.hof"))
        model = zoo[name].build()
        (x,) = random_inputs(zoo[name].inputs, seed=7)
        with torch.no_grad():
            want = model(x)
        np.savez(out / f"{name}.npz", x=x.numpy(), want=want.numpy())
        torch.save(model.state_dict(), out / f"{name}.pt")
        delegate = result.assembled.manifest["delegates"][0]["metadata"]
        print(f"{name}: partitioned and lowered in {seconds:.1f}s -> {name}.hof ({size / 1e6:.1f} MB, "
              f"{delegate['kernels']} kernels, {delegate['dispatches']} dispatches, "
              f"coverage {result.report.coverage('vulkan'):.0f}%)")


# -- --run --------------------------------------------------------------------------------------
def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def run_handoff(path: Path, x: np.ndarray, want: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    import handoff

    plugins = handoff.plugins.Plugins(autoload=False, extra=["handoff_vulkan.plugin"])
    options: dict[str, str] = {"timestamps": "1"}
    if args.adapter:
        options["adapter"] = args.adapter
    start = time.perf_counter()
    program = handoff.load(path, options={"vulkan": options}, plugins=plugins)
    load_s = time.perf_counter() - start
    with program:
        first = time.perf_counter()
        (got,) = program.run([x])
        first_s = time.perf_counter() - first
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
    return {"adapter": adapter, "load_ms": load_s * 1e3, "first_run_ms": first_s * 1e3,
            "e2e_ms": _median_ms(wall), "e2e_p90_ms": float(np.percentile(wall, 90)) * 1e3,
            "gpu_ms": _median_ms(gpu), "max_rel_err": _rel_err(got, want),
            "host_phases_ms": {k: _median_ms([p[k] for p in phases if k in p]) for k in (phases[0] if phases else {})},
            "kernels": meta.get("kernels"), "dispatches": meta.get("dispatches")}


def run_torch(name: str, state: Path, x: np.ndarray, want: np.ndarray, args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from handoff.zoo import BUILTIN

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = BUILTIN[name].build()
    model.load_state_dict(torch.load(state, map_location="cpu"))
    model = model.eval().cuda()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        got = model(xt.cuda()).cpu().numpy()
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
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "e2e_ms": _median_ms(wall),
            "e2e_p90_ms": float(np.percentile(wall, 90)) * 1e3, "gpu_ms": _median_ms(dev),
            "max_rel_err": _rel_err(got, want)}


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))


def run(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"host": platform.node(), "python": sys.version.split()[0], "models": {}}
    for path in sorted(directory.glob("*.hof")):
        name = path.stem
        ref = np.load(directory / f"{name}.npz")
        x, want = ref["x"], ref["want"]
        entry: dict[str, Any] = {"handoff_vulkan": run_handoff(path, x, want, args)}
        if not args.no_torch:
            entry["torch_cuda"] = run_torch(name, directory / f"{name}.pt", x, want, args)
        ours, theirs = entry["handoff_vulkan"], entry.get("torch_cuda")
        if theirs:
            entry["ratio_e2e"] = ours["e2e_ms"] / theirs["e2e_ms"]
            entry["ratio_gpu"] = ours["gpu_ms"] / theirs["gpu_ms"]
        results["models"][name] = entry
        _print(name, entry)
    return results


def _print(name: str, entry: dict[str, Any]) -> None:
    ours, theirs = entry["handoff_vulkan"], entry.get("torch_cuda")
    print(f"{name}: handoff vulkan on {ours['adapter']}: load {ours['load_ms']:.0f} ms, first run "
          f"{ours['first_run_ms']:.1f} ms, end to end median {ours['e2e_ms']:.2f} ms (p90 {ours['e2e_p90_ms']:.2f}), "
          f"GPU {ours['gpu_ms']:.3f} ms, max rel err {ours['max_rel_err']:.1e}")
    print(f"{name}: handoff run phases (median ms, {ours['dispatches']} dispatches of {ours['kernels']} kernels): "
          + ", ".join(f"{k} {v:.3f}" for k, v in ours["host_phases_ms"].items()))
    if theirs:
        print(f"{name}: torch {theirs['torch']} CUDA fp32 (TF32 off) on {theirs['device']}: end to end median "
              f"{theirs['e2e_ms']:.2f} ms (p90 {theirs['e2e_p90_ms']:.2f}), GPU {theirs['gpu_ms']:.3f} ms, "
              f"max rel err {theirs['max_rel_err']:.1e}")
        print(f"{name}: handoff/torch: end to end x{entry['ratio_e2e']:.2f}, GPU time x{entry['ratio_gpu']:.2f}")
    else:
        print(f"{name}: no CUDA here: correctness run only, the timings above measure nothing of interest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--lower", metavar="DIR", type=Path, help="partition and lower the models into DIR (needs TVM)")
    mode.add_argument("--run", metavar="DIR", type=Path, help="run the .hof files of DIR (needs wgpu, a Vulkan GPU)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"zoo models to lower (default {','.join(MODELS)})")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--adapter", default=os.environ.get("HANDOFF_VULKAN_ADAPTER", ""),
                        help="vulkan.adapter option: substring of the adapter to use")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch CUDA baseline")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.lower:
        lower(args.lower, [m.strip() for m in args.models.split(",") if m.strip()])
        return 0
    results = run(args.run, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["models"] else 1


if __name__ == "__main__":
    sys.exit(main())
