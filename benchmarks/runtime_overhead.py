"""What the runtime adds on top of a delegate's kernel: a tiny TVM program, timed in one run.

    python benchmarks/runtime_overhead.py [--runs 20000]

One program holds one TVM delegate computing relu on a 1x16 float32 tensor; a second one chains
three TVM delegates (relu -> cumsum -> relu, one delegate each, assembled by hand from the lowered
blobs so that every op is its own delegate). For each it times, interleaved in the same rounds
(``_timing.interleaved_median_ms``):

* ``bare``: the Relax VM calls alone, on TVM tensors prepared once (the floor);
* ``execute``: ``TvmRuntime.execute`` on the numpy input (one-delegate program only);
* ``run``: ``Program.run`` on a numpy input whose data is 64-byte aligned (what TVM's generated
  code needs, so the input goes in through DLPack without a copy), and on a misaligned one (the
  runtime copies it into an aligned buffer first; numpy's allocator gives 16-byte alignment).

and prints medians in microseconds and the overhead per delegate: ``(run - bare) / delegates``.
Target (issue "Core 2"): at most 10 us per CPU delegate. Not a test; numbers only.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from _timing import interleaved_median_ms  # benchmarks/, next to this script

SHAPE = (1, 16)


def aligned(array: np.ndarray, offset: int = 0) -> np.ndarray:
    """A copy of ``array`` whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(array.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def build(work: str) -> tuple[str, str]:
    """The one-delegate program and the three-delegate chain, written under ``work``."""
    import torch

    import handoff
    from handoff.program import write_program

    class Relu(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x)

    class Cumsum(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    x = torch.randn(*SHAPE)
    relu = handoff.partition(Relu(), (x,), backends=["tvm"], fallback=False, aten=False)
    cumsum = handoff.partition(Cumsum(), (x,), backends=["tvm"], fallback=False, aten=False)
    single = os.path.join(work, "relu.hof")
    relu.write(single)

    value = {"dtype": "float32", "shape": list(SHAPE)}
    (relu_delegate,), (cumsum_delegate,) = relu.assembled.manifest["delegates"], cumsum.assembled.manifest["delegates"]
    segments = [relu.assembled.segments[relu_delegate["segment"]], cumsum.assembled.segments[cumsum_delegate["segment"]]]
    delegates = [dict(relu_delegate, segment=0, partition="relu_0"), dict(cumsum_delegate, segment=1, partition="cumsum"),
                 dict(relu_delegate, segment=0, partition="relu_1")]
    manifest = {"handoff_version": handoff.__version__, "metadata": {"model": "relu-cumsum-relu"},
                "values": [value] * 4, "inputs": [{"name": "x", "value": 0}], "outputs": [{"name": "y", "value": 3}],
                "constants": [], "delegates": delegates,
                "instructions": [{"op": "delegate", "delegate": i, "inputs": [i], "outputs": [i + 1]} for i in range(3)]}
    chain = os.path.join(work, "chain.hof")
    write_program(chain, manifest, segments)
    return single, chain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20000, help="timed calls of each contender")
    args = ap.parse_args()
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-bench-"))
    work = tempfile.mkdtemp(prefix="handoff-overhead-")
    single_path, chain_path = build(work)

    import handoff

    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    x_aligned, x_misaligned = aligned(x), aligned(x, 16)
    with handoff.load(single_path) as single, handoff.load(chain_path, allow_unsigned=True) as chain:  # assembled here, unsigned
        import tvm_ffi

        (runtime, handle), = single._handles
        mains = [h.main for _, h in chain._handles]
        t = tvm_ffi.from_dlpack(x_aligned)

        def bare_chain():
            value = t
            for main in mains:
                value = main(value)[0]
            return value

        want = np.cumsum(np.maximum(x, 0), axis=1)
        np.testing.assert_allclose(chain.run([x_misaligned])[0], want, rtol=1e-6)
        np.testing.assert_allclose(single.run([x_aligned])[0], np.maximum(x, 0))
        times = interleaved_median_ms({
            "bare (1 VM call)": lambda: handle.main(t),
            "TvmRuntime.execute": lambda: runtime.execute(handle, [x_aligned]),
            "Program.run, aligned input": lambda: single.run([x_aligned]),
            "Program.run, misaligned input": lambda: single.run([x_misaligned]),
            "bare chain (3 VM calls)": bare_chain,
            "chain Program.run, aligned input": lambda: chain.run([x_aligned]),
            "chain Program.run, misaligned input": lambda: chain.run([x_misaligned]),
        }, args.runs, rounds=20, warmup=200)
    us = {k: v * 1e3 for k, v in times.items()}
    width = max(map(len, us))
    for name, value in us.items():
        print(f"{name:<{width}}  {value:8.2f} us")
    print()
    for kind in ("aligned", "misaligned"):
        one = us[f"Program.run, {kind} input"] - us["bare (1 VM call)"]
        three = (us[f"chain Program.run, {kind} input"] - us["bare chain (3 VM calls)"]) / 3
        print(f"overhead per delegate, {kind} input: 1 delegate {one:6.2f} us, 3-delegate chain {three:6.2f} us "
              f"(target <= 10 us)")


if __name__ == "__main__":
    main()
