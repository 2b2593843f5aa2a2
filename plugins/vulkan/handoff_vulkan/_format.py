"""The delegate blob of handoff-vulkan, and what both halves share (options, grid folding, uniforms).

Imports neither torch, TVM nor wgpu: used by the plugin module, the compiler and the runtime.
The layout is specified in ``docs/vulkan-blob.md``; in short, the core's blob envelope
(:mod:`handoff.blob`: magic ``b"HOFVULKN"``, format version, JSON header) with one section,
``data``: the weights, each at a DATA_ALIGN-aligned offset.

The header holds the WGSL kernels, the buffers (inputs, weights, intermediates, outputs), the
dispatches in order (kernel, bound buffer ranges, scalar arguments, grid) and the device limits
the kernels need.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Mapping

from handoff import Option, blob

MAGIC = b"HOFVULKN"
FORMAT_VERSION = 2  # 1 was the layout before the shared handoff.blob envelope
#: Alignment of the data section and of every weight in it (Vulkan's largest
#: minStorageBufferOffsetAlignment is 256).
DATA_ALIGN = 256
#: Bytes of uniform buffer reserved per dispatch (>= minUniformBufferOffsetAlignment everywhere).
UNIFORM_SLOT = 256
#: WebGPU's guaranteed maxComputeWorkgroupsPerDimension; TVM folds wider x grids into z.
MAX_GRID_DIM = 65535

#: Tensor dtypes a delegate can take, hold and return -> (WGSL scalar type, bytes). ``f16`` needs
#: the adapter's ``shader-f16`` feature (the runtime asks for it, and refuses a delegate that uses
#: f16 on an adapter without it).
DTYPES: dict[str, tuple[str, int]] = {"float32": ("f32", 4), "int32": ("i32", 4), "uint32": ("u32", 4),
                                      "float16": ("f16", 2)}
#: WGSL scalar types allowed as scalar (uniform) kernel arguments -> struct format character.
POD_TYPES = {"i32": "i", "u32": "I", "f32": "f"}

#: WebGPU's guaranteed ``maxStorageBuffersPerShaderStage`` (the spec's default limit, wgpu's
#: ``Limits::default()``): a blob within it loads on any conformant adapter.
MAX_STORAGE_BUFFERS = 8
#: WebGPU's guaranteed ``maxStorageBufferBindingSize`` (128 MiB, wgpu's ``Limits::default()``; its
#: ``maxBufferSize`` is twice that): a blob none of whose buffers is larger loads on any adapter.
MAX_BINDING_BYTES = 128 << 20
#: Dispatches in a run's first submission (runtime option ``first_submit``).
FIRST_SUBMIT = 8
#: The most threads ``load_threads=auto`` creates pipelines with.
MAX_LOAD_THREADS = 8
#: Compile options (``handoff partition --option vulkan.NAME=VALUE``).
OPTIONS: dict[str, Option] = {
    "fuse": Option("bool", "fuse neighbouring ops into one kernel with TVM's FuseOps (0 gives every op its own kernel)",
                   default=True, compare=(True, False)),
    "max_storage_buffers": Option(
        "int", "most storage buffers one kernel may bind (tensor inputs + outputs); a node needing more is declined, "
               "a fused group over it is split into its ops. Default 8: WebGPU's guaranteed "
               "maxStorageBuffersPerShaderStage (wgpu's default limits), so the program loads on every WebGPU "
               "adapter; raise it only for the adapter you ship to (lavapipe allows 32). At most 2**32-1, "
               "since WebGPU limits are 32-bit",
        default=MAX_STORAGE_BUFFERS, min=1, max=2**32 - 1),
    "max_storage_buffer_binding_size": Option(
        "int", "largest storage buffer one kernel may bind, in bytes (a tensor it reads or writes, weights included); "
               "a node reading or writing a larger tensor is declined. Default 134217728 (128 MiB): WebGPU's "
               "guaranteed maxStorageBufferBindingSize (wgpu's default limits), so the program loads on every WebGPU "
               "adapter (lavapipe allows no more); raise it only for the adapter you ship to. At most 2**32-1, "
               "Vulkan's maxStorageBufferRange being 32-bit",
        default=MAX_BINDING_BYTES, min=4, max=2**32 - 1),
}
#: Runtime options (``handoff run --option vulkan.NAME=VALUE``, ``handoff.load(..., options=)``).
RUNTIME_OPTIONS: dict[str, Option] = {
    "adapter": Option("str", "case-insensitive substring of the Vulkan adapter to run on, as wgpu names it (e.g. "
                             "'nvidia', 'llvmpipe' for Mesa's lavapipe); default: the first discrete, then integrated, "
                             "then virtual, then CPU adapter"),
    "timestamps": Option("bool", "time every run on the GPU with timestamp queries (needs the adapter's "
                                 "timestamp-query feature)", default=False),
    "first_submit": Option("int", "dispatches in a run's first queue submission; each later submission holds twice "
                                  "as many as the one before, so the GPU starts on the first while the host records "
                                  "the rest (on an H200, MobileNetV2's 117 dispatches take the host about 0.6 ms to "
                                  f"record); 0: the whole run in one submission. Default {FIRST_SUBMIT}",
                           default=FIRST_SUBMIT, min=0, max=2**31 - 1),
    "load_threads": Option("int", "threads that create the kernels' shader modules and pipelines at load (the "
                                  "driver compiling pipelines is most of a load on a GPU); default 'auto': one per "
                                  f"CPU core, at most {MAX_LOAD_THREADS}",
                           default=min(os.cpu_count() or 1, MAX_LOAD_THREADS), min=1, max=64, aliases=("auto",)),
}


def pack(header: Mapping[str, Any], data: bytes) -> bytes:
    """The blob: the core's envelope (:mod:`handoff.blob`) holding ``header`` and one section,
    ``data`` (the weights), aligned to :data:`DATA_ALIGN`."""
    return blob.pack(MAGIC, FORMAT_VERSION, header, {"data": data}, align=DATA_ALIGN)


def unpack(data: memoryview | bytes) -> tuple[dict[str, Any], memoryview]:
    """``(header, data section)`` of a blob; ``ValueError`` with the fix for a foreign or newer blob."""
    _, header, sections = blob.unpack(data, MAGIC, FORMAT_VERSION, "vulkan delegate blob")
    if "data" not in sections:
        raise ValueError("vulkan delegate blob is corrupt: it has no 'data' section")
    return header, sections["data"]


def fold_grid(x: int, y: int, max_dim: int = MAX_GRID_DIM) -> tuple[int, int, int]:
    """The workgroup counts to dispatch for a kernel whose logical grid is ``x`` by ``y``.

    TVM's WGSL kernels read their block index as ``blockIdx.z * gridDim.x + blockIdx.x`` and skip
    blocks at or past the logical ``x`` (passed in the uniform as ``packGridDimX``), so an ``x``
    wider than a dispatch dimension may go is spread over ``z``: halve ``x`` (rounding up) and
    double ``z`` until it fits; the same rule as TVM's own web runtime (``web/src/webgpu.ts``).
    """
    if x < 1 or y < 1:
        raise ValueError(f"empty grid {x}x{y}")
    if y > max_dim:
        raise ValueError(f"grid y {y} exceeds the device's {max_dim} workgroups per dimension")
    z = 1
    while x > max_dim:
        x = (x + 1) // 2
        z *= 2
    if z > max_dim:
        raise ValueError(f"grid x too large for the device ({max_dim} workgroups per dimension)")
    return x, y, z


def uniform_bytes(pods: list[list[Any]], pack_grid_x: int) -> bytes:
    """The uniform of one dispatch: each scalar argument as 4 bytes (``[wgsl_type, value]``), then
    ``packGridDimX`` (the logical grid x) as u32, zero-padded to 16 bytes as WGSL lays it out."""
    fmt = "<" + "".join(POD_TYPES[t] for t, _ in pods) + "I"
    raw = struct.pack(fmt, *[(float(v) if t == "f32" else int(v)) for t, v in pods], pack_grid_x)
    return raw + b"\0" * (-len(raw) % 16)
