"""Reproducer for ExecuTorch crashes found by fuzzing (docs/upstream/executorch-*.md).

Uses ExecuTorch's public Python API only (no handoff): load a ``.pte`` from bytes with the default
verification (``InternalConsistency``), then load its ``forward`` method, which hands the
XNNPACK delegate's payload to ``XNNCompiler``. A malformed program should raise a Python
exception; the inputs next to this script kill the process instead (abort).

    python repro_executorch.py PROGRAM.pte
"""

import sys

from executorch.runtime import Runtime, Verification

data = open(sys.argv[1], "rb").read()
program = Runtime.get().load_program(data, verification=Verification.InternalConsistency)
print("program loaded", flush=True)
method = program.load_method("forward")
print("method loaded (no crash)", flush=True)
