"""torchvision models (random init): handoff ``--backends xnnpack`` vs ExecuTorch's own XNNPACK program.

    python benchmarks/torchvision_vs_executorch.py [--models mobilenet_v3_small,shufflenet_v2_x0_5,...]
                                                   [--runs 50] [--size 224]
    python benchmarks/torchvision_vs_executorch.py --sweep [--size 64] [--backends tvm]

For each model, in one process on the same input: handoff's program
(``handoff.partition(model, inputs, backends=["xnnpack"])``, tvm taking what XNNPACK declines) and
ExecuTorch's (``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()]).to_executorch()``),
both loaded, timed in interleaved rotated rounds (``_timing.interleaved_median_ms``). Printed per
model: delegates per backend (and kernels ExecuTorch runs outside its delegates), median ms each,
the ratio handoff / ExecuTorch, and the largest absolute difference of each from eager torch.
Target (issue "Core 2"): mobilenet_v3_small and shufflenet_v2_x0_5 within 1.2x of ExecuTorch;
mobilenet_v2 and resnet18 are controls. ``--sweep`` partitions a wider set of torchvision
classification models at a small input and checks each against eager (no timing); ``--backends``
(default ``xnnpack``) says what it partitions for (``tvm``: TVM's untuned schedules alone).

The models are built by :mod:`handoff.zoo.vision` (which makes torchvision importable beside the
CPU torch). The test ``plugins/xnnpack/tests/test_torchvision.py`` uses these helpers too. Not a
test; numbers only.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

DEFAULT_MODELS = "mobilenet_v3_small,shufflenet_v2_x0_5,mobilenet_v2,resnet18"
#: classification models small enough to sweep at 1x3x64x64 on 2 cores (a few seconds each)
SWEEP_MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x0_5",
                "squeezenet1_1", "mnasnet0_5", "efficientnet_b0", "regnet_x_400mf", "googlenet", "alexnet")


def build(name: str, size: int, seed: int = 0) -> tuple[Any, tuple[Any, ...]]:
    """torchvision model ``name`` as ``torchvision:NAME`` builds it (random weights, calibrated
    norms: :func:`handoff.zoo.vision.build`), and a ``1x3xSIZExSIZE`` example input."""
    import torch

    from handoff.zoo import vision

    return vision.build(name, (1, 3, size, size), seed), (torch.randn(1, 3, size, size),)


def executorch_program(model: Any, inputs: Sequence[Any], emit: bool = True) -> tuple[Any, dict[str, int]]:
    """ExecuTorch's own flow: ``to_edge_transform_and_lower`` with ``XnnpackPartitioner`` (then
    ``to_executorch`` when ``emit``). Returns the program (or the Edge manager) and what its
    graph runs: ``{"XnnpackBackend delegates": n, "<op> outside": k, ...}``."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(model, tuple(inputs))
    manager = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    runs: collections.Counter[str] = collections.Counter()
    gm = manager.exported_program().graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target.__name__ == "getitem":
            continue
        if node.target is torch.ops.higher_order.executorch_call_delegate:
            runs[f"{getattr(gm, node.args[0].target).backend_id} delegates"] += 1
        else:
            runs[f"{node.target.__name__.split('.')[-2]} outside"] += 1  # aten.mean.dim -> mean
    return (manager.to_executorch() if emit else manager), dict(runs)


def _handoff(model: Any, inputs: Sequence[Any], backends: Sequence[str] = ("xnnpack",)) -> tuple[Any, dict[str, int]]:
    import handoff

    result = handoff.partition(model, inputs, backends=list(backends))
    stats = result.report.stats
    runs = {f"{b} delegates": s.partitions for b, s in stats.items() if s.partitions}
    if stats["aten"].nodes:
        runs["host ATen ops"] = stats["aten"].nodes
    return result, runs


def bench_model(name: str, size: int, runs: int) -> dict[str, Any]:
    import torch
    from executorch.extension.pybindings import portable_lib as et

    import handoff
    from _timing import interleaved_median_ms  # benchmarks/, next to this script

    model, inputs = build(name, size)
    np_inputs = [t.numpy() for t in inputs]
    with torch.no_grad():
        want = model(*inputs).numpy()
    et_prog, et_runs = executorch_program(model, inputs)
    et_buffer = et_prog.buffer  # ExecuTorch reads from it for the module's lifetime
    module = et._load_for_executorch_from_buffer(et_buffer)
    result, hof_runs = _handoff(model, inputs)
    program = handoff.load(result.to_bytes())
    try:
        et_err = float(np.abs(module.forward(list(inputs))[0].numpy() - want).max())
        hof_err = float(np.abs(program.run(np_inputs)[0] - want).max())
        with torch.no_grad():
            ms = interleaved_median_ms({"et": lambda: module.forward(list(inputs)),
                                        "hof": lambda: program.run(np_inputs)}, runs, warmup=10)
    finally:
        program.close()
    return {"model": name, "et_runs": et_runs, "hof_runs": hof_runs, "et_ms": ms["et"], "hof_ms": ms["hof"],
            "et_err": et_err, "hof_err": hof_err}


def sweep(names: Sequence[str], size: int, backends: Sequence[str] = ("xnnpack",)) -> None:
    """Each model through handoff ``--backends BACKENDS`` against eager on fresh random inputs."""
    import time

    from handoff.testing import check_against_eager

    print(f"{'model':22} {'handoff delegates':36} {'s':>5}  vs eager (fp32 tolerance)")
    for name in names:
        model, inputs = build(name, size)
        t0 = time.perf_counter()
        try:
            result, runs = _handoff(model, inputs, backends)
            check_against_eager(result.to_bytes(), model, [(tuple(inputs[0].shape), "float32")])
            verdict = "ok"
        except Exception as exc:  # a sweep reports every model, whatever fails
            runs, verdict = {}, f"FAILED: {' '.join(str(exc).split())[:200]}"
        print(f"{name:22} {_runs(runs):36} {time.perf_counter() - t0:5.0f}  {verdict}", flush=True)


def _runs(runs: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(runs.items())) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help=f"comma-separated torchvision model names (default {DEFAULT_MODELS})")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--size", type=int, default=None, help="input height and width (default 224; 64 with --sweep)")
    ap.add_argument("--sweep", action="store_true", help="check a wide set of models against eager instead of timing")
    ap.add_argument("--backends", default="xnnpack", help="with --sweep: the backends to partition for (default xnnpack)")
    args = ap.parse_args()
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-bench-"))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    if args.sweep:
        sweep(args.models.split(",") if args.models else SWEEP_MODELS, args.size or 64, args.backends.split(","))
        return
    size = args.size or 224
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, input 1x3x{size}x{size}, "
          f"{args.runs} runs interleaved; ratio = handoff / executorch")
    print(f"{'model':20} {'handoff delegates':34} {'executorch delegates':44} {'handoff ms':>10} {'et ms':>7} "
          f"{'ratio':>6} {'hof err':>8} {'et err':>8}")
    for name in (args.models or DEFAULT_MODELS).split(","):
        r = bench_model(name, size, args.runs)
        print(f"{name:20} {_runs(r['hof_runs']):34} {_runs(r['et_runs']):44} {r['hof_ms']:10.2f} {r['et_ms']:7.2f} "
              f"{r['hof_ms'] / r['et_ms']:6.2f} {r['hof_err']:8.1e} {r['et_err']:8.1e}", flush=True)


if __name__ == "__main__":
    main()
