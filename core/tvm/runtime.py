"""The runtime half of the ``tvm`` backend: a delegate blob is a shared library holding a Relax VM
executable; ``load`` opens it in a Relax VM on the CPU and ``execute`` calls its ``main``.

Values stay TVM tensors between TVM delegates (memory domain ``"tvm:cpu"``): ``execute`` takes
numpy arrays through DLPack without a copy (unless the array is not 64-byte aligned, which TVM's
generated code assumes), passes TVM tensors through, and returns the VM's output tensors as they
are; ``to_host`` views them as numpy arrays, again through DLPack. Not reentrant: one Relax VM
called from two threads at once crashes, so the core runs one ``execute`` per delegate at a time.

Imports neither torch nor TVM at module level. When TVM is first imported here and torch is not
already loaded, torch is hidden from that import: ``tvm_ffi`` imports torch opportunistically
(``try: import torch``, only for DLPack interop with torch tensors, which this runtime never
uses), and that alone costs ~1.5 s and ~200 MB per process. A process that imports torch later
still gets working TVM (DLPack exchange with torch tensors goes through ``__dlpack__``).
"""

from __future__ import annotations

import dataclasses
import operator
import platform
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from handoff import Runtime, native_library

#: What to install when TVM is missing (the runtime needs no torch).
INSTALL_HINT = "pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0"
#: The memory domain of every TVM delegate's outputs (see handoff.Runtime.memory).
MEMORY = "tvm:cpu"
#: Data alignment TVM's generated code assumes of its arguments (``tvm.runtime.from_dlpack``
#: checks the same): an input that is not aligned so is copied into an array that is.
ALIGNMENT = 64
#: DLPack version asked of numpy: 1.0 carries a read-only flag, so read-only arrays (constants
#: mapped from the program file, a caller's frozen input) go to TVM without a copy. TVM only reads
#: its arguments.
_DLPACK_VERSION = (1, 0)

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def host_triple() -> str:
    """The target triple of this machine, spelled the way the compiler writes it into metadata
    (``x86_64-linux-gnu``, ``aarch64-linux-gnu``, ``arm64-apple-darwin``...).

    Named from :mod:`platform` rather than LLVM's default triple: the TVM wheel's LLVM reports
    its build triple (``x86_64-conda-linux-gnu``), not the machine's."""
    machine = platform.machine().lower()
    arch = _ARCH_ALIASES.get(machine, machine)
    system = platform.system()
    if system == "Darwin":
        return f"{'arm64' if arch == 'aarch64' else arch}-apple-darwin"
    if system == "Windows":
        return f"{arch}-pc-windows-msvc"
    if system == "Android" or hasattr(sys, "getandroidapilevel"):
        return f"{arch}-linux-android"
    return f"{arch}-linux-gnu"


def import_tvm() -> Any:
    """Import and return ``tvm``, keeping torch out of the process when it is not there yet."""
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    # A None entry makes ``import torch`` raise ImportError, which tvm_ffi treats as "no torch".
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tvm
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm


@dataclasses.dataclass
class _Delegate:
    """What ``load`` returns: the VM, its entry function, and the arity the compiler recorded."""

    vm: Any
    main: Any
    num_inputs: int
    num_outputs: int
    tensor_type: type  # TVM's tensor class: inputs of this type go to the VM as they are
    from_dlpack: Any  # tvm_ffi.from_dlpack
    array_size: Any  # len() of the tvm_ffi Array main returns
    array_item: Any  # (array, i) -> its item i


class TvmRuntime(Runtime):
    """Runs TVM delegates on the CPU (see :class:`handoff.Runtime`)."""

    native_code = True  # a delegate is a shared library

    def is_available(self) -> tuple[bool, str]:
        try:
            import_tvm()
        except Exception as exc:  # ImportError, or a broken install (mismatched tvm-ffi, missing .so)
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return False, f"apache-tvm cannot be imported ({reason}): {INSTALL_HINT}"
        return True, ""

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> _Delegate:
        """Check the delegate fits this host and TVM, then open it in a Relax VM.

        The blob is a shared library: native code, written to a private file by
        :func:`handoff.native_library` only when its bytes are the ones the user trusts, and
        removed as soon as it is loaded."""
        tvm = import_tvm()
        _check_compatible(tvm, metadata)
        with native_library(blob, "tvm delegate") as path:
            lib = tvm.runtime.load_module(path)
        from tvm.runtime.vm import VirtualMachine

        vm = VirtualMachine(lib, tvm.cpu())
        import tvm_ffi

        # tvm_ffi's own functions behind Array's len() and [i]: the Python wrappers around them
        # cost 2 us per output (index normalisation, slices); the fallback is those wrappers.
        ffi = getattr(tvm_ffi, "_ffi_api", None)
        size, item = getattr(ffi, "ArraySize", None), getattr(ffi, "ArrayGetItem", None)
        if size is None or item is None:
            size, item = len, operator.getitem
        return _Delegate(vm, vm[str(metadata.get("entry", "main"))],
                         int(metadata["num_inputs"]), int(metadata["num_outputs"]),
                         tvm.runtime.Tensor, tvm_ffi.from_dlpack, size, item)

    def memory(self, handle: _Delegate) -> str:
        return MEMORY

    def execute(self, handle: _Delegate, inputs: Sequence[Any]) -> list[Any]:
        """Run the VM on numpy arrays or TVM tensors; returns the VM's output tensors."""
        if len(inputs) != handle.num_inputs:
            raise ValueError(f"TVM delegate takes {handle.num_inputs} inputs, got {len(inputs)}")
        tensor = handle.tensor_type
        result = handle.main(*[a if type(a) is tensor else _tensor(a, handle.from_dlpack) for a in inputs])
        # The compiler imports with unwrap_unit_return_tuple=False, so main returns a tuple (a
        # tvm_ffi Array); a bare tensor is accepted too, should an executable return one.
        if type(result) is tensor:
            return [result]
        count, item = handle.array_size(result), handle.array_item
        if count != handle.num_outputs:
            raise ValueError(f"TVM delegate returned {count} outputs, its metadata says {handle.num_outputs}")
        return [item(result, i) for i in range(count)]

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]:
        """Numpy views of TVM tensors (DLPack, no copy)."""
        return [np.from_dlpack(v) for v in values]

    def release(self, handle: _Delegate) -> None:
        # Dropping the last references frees the VM, its memory pools and (via the module) the library.
        handle.main = handle.vm = None


def _tensor(array: Any, from_dlpack: Any) -> Any:
    """A TVM tensor viewing ``array`` (numpy, or anything ``numpy.asarray`` takes) through DLPack,
    or, when its data is not :data:`ALIGNMENT`-aligned, viewing an aligned copy of it."""
    if type(array) is not np.ndarray:
        array = np.asarray(array)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    tensor = from_dlpack(array.__dlpack__(max_version=_DLPACK_VERSION))
    if tensor.data_ptr() % ALIGNMENT == 0 or array.size == 0:
        return tensor
    # numpy allocates at 16 bytes or better, so the padding is whole items (ALIGNMENT >= itemsize).
    n, itemsize = array.size, array.itemsize
    raw = np.empty(n + ALIGNMENT // itemsize, array.dtype)
    start = -from_dlpack(raw).data_ptr() % ALIGNMENT // itemsize  # data_ptr: cheaper than raw.ctypes
    copy = raw[start:start + n]
    copy[...] = array.reshape(-1)
    return from_dlpack(copy.reshape(array.shape).__dlpack__(max_version=_DLPACK_VERSION))


def _check_compatible(tvm: Any, metadata: Mapping[str, Any]) -> None:
    """Refuse, with the fix, a delegate this host cannot run: another triple, another TVM minor
    version (the VM executable format is not stable across them), or a CPU lacking features the
    code was compiled to use (it would die of SIGILL instead)."""
    triple, here = str(metadata.get("triple", "")), host_triple()
    if triple != here:
        raise ValueError(f"delegate was compiled for {triple}; this host is {here}: run the program on "
                         f"{triple}, or re-partition it on this machine with --option tvm.target=host")
    built, installed = str(metadata.get("tvm_version", "")), tvm.__version__
    if built.split(".")[:2] != installed.split(".")[:2]:
        raise ValueError(f"delegate was compiled with apache-tvm {built}; this host has {installed}: "
                         f"install apache-tvm=={built} or re-partition with {installed}")
    mcpu = metadata.get("mcpu")
    if mcpu:
        missing = _missing_cpu_features(tvm, triple, str(mcpu))
        if missing:
            shown = ", ".join(sorted(missing)[:8]) + (", ..." if len(missing) > 8 else "")
            raise ValueError(f"delegate was compiled for CPU {mcpu}, which has features this host's CPU lacks "
                             f"({shown}): re-partition with --option tvm.mcpu=generic, or on this machine")


#: LLVM feature names of the vector ISA extensions generated kernels use. LLVM's feature lists also
#: hold tuning hints ("slow-3ops-lea", "false-deps-popcnt") that differ between CPUs of the same ISA.
_ISA_FEATURE_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "neon", "sve", "sme", "dotprod",
                         "i8mm", "fullfp16", "bf16")


def _missing_cpu_features(tvm: Any, triple: str, mcpu: str) -> set[str]:
    """Vector ISA features of ``mcpu`` that LLVM's idea of this host's CPU lacks (empty when
    unknown)."""
    try:
        codegen = tvm.target.codegen
        host_cpu = codegen.llvm_get_system_cpu()
        if host_cpu == mcpu:
            return set()

        def features(cpu: str) -> set[str]:
            target = tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": cpu})
            return {f for f in codegen.llvm_get_cpu_features(target) if f.startswith(_ISA_FEATURE_PREFIXES)}

        return features(mcpu) - features(host_cpu)
    except Exception:  # a TVM built without LLVM cannot tell; loading proceeds as before
        return set()
