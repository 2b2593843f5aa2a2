"""Cold start: a fresh process, from its start to its first output, and its peak RSS.

    python benchmarks/cold_start.py [--model zoo:mobilenet_v2] [--runs 5] [--backends tvm,xnnpack,vulkan]

What an app feels when it launches: one new Python process per measurement imports the runtime,
loads the model file, runs one inference on a fixed input and prints a checksum of the output.
The parent times it from spawn to exit; the child reports its peak resident set size
(``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would count the forked parent's pages too). Contenders, on the same model and input:

* handoff: one program per backend (``--backends``), each partitioned with that backend first
  (TVM takes what it declines), loaded with ``handoff.load``;
* ExecuTorch's Python runtime (``executorch.runtime``) on ExecuTorch's own XNNPACK ``.pte``;
* ONNX Runtime (CPU execution provider) on the model exported with ``torch.onnx``.

The processes run one after another (never in parallel), in rotated order each round, after one
untimed round that warms the page cache; medians over ``--runs`` rounds, ratios to ExecuTorch.
Outputs are checked against eager torch. Not a test; numbers only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HANDOFF = """
import sys, numpy as np, handoff
x = np.load(sys.argv[2])
with handoff.load(sys.argv[1]) as program:
    y = program.run([x])[0]
print(float(np.abs(y).sum()), open("/proc/self/status").read().split("VmHWM:")[1].split()[0], flush=True)
"""

EXECUTORCH = """
import sys, numpy as np, torch
from executorch.runtime import Runtime
x = torch.from_numpy(np.load(sys.argv[2]))
method = Runtime.get().load_program(sys.argv[1]).load_method("forward")
y = method.execute([x])[0].numpy()
print(float(np.abs(y).sum()), open("/proc/self/status").read().split("VmHWM:")[1].split()[0], flush=True)
"""

ORT = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[2])
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
y = session.run(None, {session.get_inputs()[0].name: x})[0]
print(float(np.abs(y).sum()), open("/proc/self/status").read().split("VmHWM:")[1].split()[0], flush=True)
"""


def _child(script: str, model: Path, x: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds from spawn to exit, peak RSS in MiB, and the output checksum of one fresh process."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", script, str(model), str(x)], env=env,
                                stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()  # one line: checksum, peak RSS in kB
        _, status, _ = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        if code:
            err.seek(0)
            raise SystemExit(f"{model.name}: the child failed ({code}):\n{err.read().decode()[-2000:]}")
    checksum, hwm_kb = out.decode().split()
    return seconds, int(hwm_kb) / 1024, checksum


def build(spec: str, backends: list[str], work: Path) -> tuple[dict[str, tuple[str, Path]], Path, float]:
    """Every contender's model file, the input, and eager torch's checksum."""
    import onnxruntime  # noqa: F401  -- fail early when a peer is missing
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    import handoff
    from handoff.models import random_inputs

    zoo = handoff.get_plugins().zoo()[spec.removeprefix("zoo:")]
    model = zoo.build()
    inputs = random_inputs(zoo.inputs, seed=7)
    if len(inputs) != 1:
        raise SystemExit(f"{spec}: this benchmark feeds one input; the model takes {len(inputs)}")
    x = work / "x.npy"
    np.save(x, inputs[0].numpy())
    with torch.no_grad():
        want = float(model(*inputs).abs().sum())
    files: dict[str, tuple[str, Path]] = {}
    for backend in backends:
        path = work / f"{backend}.hof"
        handoff.partition(spec, backends=[backend], use_cache=False).write(str(path))
        files[f"handoff {backend}"] = (HANDOFF, path)
    ep = torch.export.export(model, tuple(inputs))
    pte = work / "model.pte"
    pte.write_bytes(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    files["executorch (python runtime)"] = (EXECUTORCH, pte)
    onnx = work / "model.onnx"
    torch.onnx.export(model, tuple(inputs), str(onnx), dynamo=True, external_data=False, verbose=False)
    files["onnxruntime cpu"] = (ORT, onnx)
    return files, x, want


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:mobilenet_v2")
    ap.add_argument("--backends", default="tvm,xnnpack,vulkan")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-bench-"))
    runtime_dir = tempfile.mkdtemp(prefix="handoff-xdg-")  # lavapipe's OpenGL probe wants one
    os.environ.setdefault("XDG_RUNTIME_DIR", runtime_dir)
    os.environ.setdefault("XDG_CACHE_HOME", os.path.join(os.environ["HANDOFF_HOME"], "xdg-cache"))
    work = Path(tempfile.mkdtemp(prefix="handoff-cold-"))
    files, x, want = build(args.model, [b.strip() for b in args.backends.split(",") if b.strip()], work)
    env = dict(os.environ)

    names = list(files)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, str] = {}
    for r in range(args.runs + 1):  # round 0 warms the page cache and is not counted
        for name in names[r % len(names):] + names[:r % len(names)]:
            script, path = files[name]
            s, m, out = _child(script, path, x, env)
            outputs[name] = out
            if r:
                seconds[name].append(s)
                rss[name].append(m)

    ref = "executorch (python runtime)"
    ref_s = statistics.median(seconds[ref])
    print(f"{args.model}: fresh process to first output, median of {args.runs} (one process at a time), "
          f"{os.cpu_count()} CPUs; ratios are to {ref}")
    print(f"{'':30} {'start->output s':>15} {'ratio':>6} {'peak RSS MiB':>13} {'sum |y| rel err':>15}")
    for name in names:
        s, m = statistics.median(seconds[name]), statistics.median(rss[name])
        err = abs(float(outputs[name]) - want) / (abs(want) or 1.0)
        print(f"{name:30} {s:15.2f} {s / ref_s:6.2f} {m:13.0f} {err:15.1e}")


if __name__ == "__main__":
    main()
