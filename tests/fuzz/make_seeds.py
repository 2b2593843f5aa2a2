"""Regenerate the checked-in seed corpora under ``tests/fuzz/corpus/`` (needs every backend).

The seeds are the zoo's two architectures at tiny widths, so that each seed is a few KB: the zoo's
own ``EncoderLayer`` (dim 8, 2 heads) and a CNN with ``SmallCNN``'s layers at 4 channels
(conv-bn-relu, a residual block, max pool, a strided conv, average pool, linear). Each is
partitioned for every backend (programs, and the delegate blobs with their metadata) and with
no backend at all (data-only programs of host ops; also a 16-bit quantized ``Sixteen``, whose
uint16 values need format 1.5), signed by a key of its own (``tvm`` seeds must
not be trusted by the harness). Run: ``python tests/fuzz/make_seeds.py [BACKEND...]`` (with
backends named, only their seeds are replaced).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from handoff.zoo.cnn import SmallCNN

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"


class TinyCNN(SmallCNN):
    """The zoo's ``SmallCNN`` at 4 channels and 3 classes, on 1x3x8x8, with a host op after it."""

    def __init__(self) -> None:
        super().__init__(channels=(4, 4), classes=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(super().forward(x), 1)  # cumsum: a host op


def models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    from handoff.zoo._weights import calibrated
    from handoff.zoo.transformer import EncoderLayer

    torch.manual_seed(0)
    return {"cnn": (calibrated(TinyCNN(), [((1, 3, 8, 8), "float32")], seed=1), (torch.randn(1, 3, 8, 8),)),
            "attn": (calibrated(EncoderLayer(8, 2, 16), [((1, 4, 8), "float32")], seed=2), (torch.randn(1, 4, 8),))}


class Sixteen(nn.Module):
    """Linear -> ReLU between uint16 quantize/dequantize pairs (16-bit activations, format 1.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        q = (1e-3, 32768, 0, 65535, torch.uint16)
        y = ops.dequantize_per_tensor(ops.quantize_per_tensor(self.linear(x), *q), *q)
        return ops.dequantize_per_tensor(ops.quantize_per_tensor(torch.relu(y), *q), *q)


def host_models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    """Models seeded only as data-only programs (host ops; the backends take no uint16)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    torch.manual_seed(0)
    return {"q16": (Sixteen().eval(), (torch.randn(2, 8),))}


def host_seeds(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """``program/NAME-host`` and ``hostops/NAME-host``: ``model`` as a program of host ops."""
    import handoff

    data = handoff.partition(model, inputs, backends=[], fallback=False, aten=True).to_bytes()
    _write("program", f"{name}-host", data)
    _write("hostops", f"{name}-host", data)


def _write(harness: str, name: str, data: bytes) -> None:
    folder = CORPUS / harness
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    print(f"{harness}/{name}: {len(data)} bytes")


#: ``corpus/options/``: command-line option lines and input shapes (see ``fuzz_options``).
OPTION_SEEDS = {
    "xnnpack-threads": "xnnpack.threads=2\n",
    "tvm-target": "tvm.target=llvm -mcpu=native\ntvm.tune=0\n",
    "vulkan": "vulkan.adapter=llvmpipe\nvulkan.timestamps=1\nvulkan.fuse=false\n",
    "qnn": "qnn.htp_performance_mode=burst\nqnn.precision=fp16\n",
    "shapes": "1x3x224x224\n2x8:int64\n",
    # vulkan.max_storage_buffers (compile option, integer 1..2**32-1): valid, then one bad value each
    "vulkan-buffers-8": "vulkan.max_storage_buffers=8\n",
    "vulkan-buffers-32": "vulkan.fuse=false\nvulkan.max_storage_buffers= 32\n",
    "vulkan-buffers-max": "vulkan.max_storage_buffers=4294967295\n",
    "vulkan-buffers-0": "vulkan.max_storage_buffers=0\n",
    "vulkan-buffers-negative": "vulkan.max_storage_buffers=-1\n",
    "vulkan-buffers-2e32": "vulkan.max_storage_buffers=4294967296\n",
    "vulkan-buffers-float": "vulkan.max_storage_buffers=8.5\n",
    "vulkan-buffers-word": "vulkan.max_storage_buffers=eight\n",
    "vulkan-buffers-empty": "vulkan.max_storage_buffers=\n",
    # vulkan.max_storage_buffer_binding_size (compile option, bytes 4..2**32-1): valid, then below its range
    "vulkan-binding-size": "vulkan.max_storage_buffer_binding_size=268435456\n",
    "vulkan-binding-size-3": "vulkan.max_storage_buffer_binding_size=3\n",
    # vulkan's runtime options load_threads (1..64 or auto) and first_submit (0..2**31-1)
    "vulkan-load": "vulkan.load_threads=4\nvulkan.first_submit=16\n",
    "vulkan-load-auto": "vulkan.load_threads=auto\nvulkan.first_submit=0\n",
    "vulkan-load-threads-0": "vulkan.load_threads=0\n",
    "vulkan-first-submit-negative": "vulkan.first_submit=-1\n",
}


def main() -> int:
    import handoff
    from handoff.program import ProgramFile

    everything = not sys.argv[1:]  # else only the named backends' seeds are replaced
    backends = sys.argv[1:] or ["xnnpack", "qnn", "vulkan", "tvm", "coreml"]
    for harness in (("program", "hostops", "options") if everything else ()) + tuple(backends):
        shutil.rmtree(CORPUS / harness, ignore_errors=True)
    for backend in backends:
        for old in CORPUS.glob(f"program/*-{backend}"):
            old.unlink()
    if everything:
        for name, text in OPTION_SEEDS.items():
            _write("options", name, text.encode())
    if everything:
        for name, (model, inputs) in host_models().items():
            host_seeds(name, model, inputs)
    for name, (model, inputs) in models().items():
        if everything:
            host_seeds(name, model, inputs)
        for backend in backends:
            result = handoff.partition(model, inputs, backends=[backend], fallback=False, aten=True,
                                       default_limits=handoff.Limits(1, None))
            data = result.to_bytes()
            if backend == "tvm":  # a shared library: what fuzz_tvm keeps away from dlopen
                _write("tvm", name, data)
                continue
            _write("program", f"{name}-{backend}", data)
            pf = ProgramFile.from_bytes(data)
            for i, d in enumerate(pf.manifest["delegates"]):
                _write(backend, f"{name}-{i}", bytes(pf.segment(d["segment"])))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HANDOFF_HOME", str(HERE / ".seeds-home"))
    sys.exit(main())
