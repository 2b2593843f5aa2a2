"""What one delegate boundary costs at run time, against what one op costs: the measurement behind
the default ``--min-partition-size`` (``handoff.pipeline.DEFAULT_MIN_PARTITION_SIZE``).

    python benchmarks/boundary_cost.py [--ops 12] [--runs 2000] [--shapes 1x16,1x32x28x28]

The model alternates ``relu`` (XNNPACK takes it; so does TVM) and ``atan`` (XNNPACK has no kernel,
TVM takes it), ``--ops`` nodes in all. Partitioned ``--backends xnnpack,tvm``:

* ``fragmented`` (min partition size 1): one delegate per node, alternating backends, so every
  edge is a boundary that crosses memory domains (XNNPACK's host tensors, TVM's DLPack tensors);
* ``whole`` (min size ``--ops``): the relu islands join TVM's partition, one delegate in all.

Both are timed interleaved in the same run (``_timing.interleaved_median_ms``). The cost of one
boundary is ``(fragmented - whole) / boundaries`` (the relu kernels cost alike on both
backends); the cost of one op is ``whole / ops``. A partition is worth its boundaries when it
runs at least ``boundary / op`` ops: that ratio, rounded, is the default minimum size. Not a
test: numbers only.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from _timing import interleaved_median_ms  # benchmarks/, next to this script


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=12, help="nodes in the alternating chain (even)")
    ap.add_argument("--runs", type=int, default=2000, help="timed runs of each program per shape")
    ap.add_argument("--shapes", default="1x16,1x32x28x28", help="comma-separated input shapes")
    args = ap.parse_args()
    os.environ.setdefault("HANDOFF_HOME", tempfile.mkdtemp(prefix="handoff-bench-"))

    import torch

    import handoff

    class Alternating(torch.nn.Module):
        def forward(self, x):
            for _ in range(args.ops // 2):
                x = torch.atan(torch.relu(x))
            return x

    model = Alternating().eval()
    print(f"{'shape':<14} {'whole us':>9} {'fragmented us':>14} {'boundaries':>10} {'us/boundary':>12} "
          f"{'us/op':>7} {'boundary/op':>11}")
    for text in args.shapes.split(","):
        shape = _shape(text)
        example = torch.randn(*shape)
        programs = {}
        for name, size in (("whole", args.ops * 2), ("fragmented", 1)):
            result = handoff.partition(model, (example,), backends=["xnnpack", "tvm"],
                                       default_limits=handoff.Limits(size))
            programs[name] = handoff.load(result.to_bytes())
        delegates = len(programs["fragmented"].manifest["delegates"])
        assert delegates == args.ops, f"expected one delegate per node, got {delegates}"
        assert len(programs["whole"].manifest["delegates"]) == 1, "the relu islands did not join tvm"
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        want = model(torch.from_numpy(x)).numpy()
        for program in programs.values():
            np.testing.assert_allclose(program.run([x])[0], want, rtol=1e-4, atol=1e-5)
        times = interleaved_median_ms({name: (lambda p=p: p.run([x])) for name, p in programs.items()},
                                      args.runs, rounds=20, warmup=50)
        whole, fragmented = times["whole"] * 1e3, times["fragmented"] * 1e3
        boundaries = delegates - 1
        per_boundary = (fragmented - whole) / boundaries
        per_op = whole / args.ops
        print(f"{text:<14} {whole:9.1f} {fragmented:14.1f} {boundaries:10d} {per_boundary:12.2f} "
              f"{per_op:7.2f} {per_boundary / per_op:11.1f}")
        for program in programs.values():
            program.close()


if __name__ == "__main__":
    main()
