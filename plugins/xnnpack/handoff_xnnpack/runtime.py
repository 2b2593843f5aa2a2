"""The runtime half of the ``xnnpack`` backend: ExecuTorch's runtime with its XNNPACK delegate.

Imports neither torch nor executorch at module level.

The binding: ExecuTorch 1.5.1's Python runtime is one extension module,
``executorch.extension.pybindings._C``, linked against libtorch and libtorch_python; it takes and
returns only ``torch.Tensor``. Its public wrappers, ``executorch.runtime`` and
``executorch.extension.pybindings.portable_lib``, import torch and then ``executorch.exir`` (the whole
ahead-of-time compiler, which pulls in torchao) just to issue an ExperimentalWarning: 3 s warm, 7 s
cold here. So the runtime imports torch (needed anyway for the binding's tensors; about 1.2 s) and
then ``_C`` directly, and calls the same functions ``executorch.runtime.Runtime.load_program`` and
``Program.load_method`` call (``_load_program_from_buffer``, ``load_method``); when ``_C`` lacks them
it falls back to ``portable_lib``. :meth:`XnnpackRuntime.execute` wraps the numpy inputs with
``torch.from_numpy`` (no copy) and returns ``Tensor.numpy()`` of the outputs, which the binding has
already copied out of the program's planned memory.

Threads: XNNPACK runs on ExecuTorch's process-wide pthreadpool. The binding exposes
``_unsafe_reset_threadpool(n)`` and ``_threadpool_get_thread_count()``. Resetting replaces the pool,
and every XNNPACK runtime created before keeps a pointer to the old one (XNNPACK captures
``get_pthreadpool()`` in ``xnn_create_runtime_v4`` at load time), so the count is only changed while
no delegate of this process is loaded; asking for another count while some are refuses to load.
"""

from __future__ import annotations

import functools
import importlib.metadata
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from handoff import ManifestList, Runtime, blob_key, one_line

from . import EXECUTORCH_VERSION, _format

#: ExecuTorch ScalarType codes (``TensorInfo.dtype()``) -> numpy dtype names.
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16",
                 6: "float32", 7: "float64", 11: "bool", 15: "bfloat16"}
_NUMPY_TYPES = set(_SCALAR_TYPES.values()) - {"bfloat16"}
_BACKEND = "XnnpackBackend"
_INSTALL = f"pip install executorch=={EXECUTORCH_VERSION}"

# ExecuTorch's thread pool is process-wide, so is what guards it: one inference at a time, and
# the number of delegates loaded on it (by any XnnpackRuntime of this process).
_POOL_LOCK = threading.Lock()
_LIVE = [0]


class _Delegate:
    """One loaded delegate: the program, the .pte bytes it reads from, its ``forward``, and what
    :meth:`XnnpackRuntime.execute` checks and converts each input with, decided at load."""

    __slots__ = ("data", "from_numpy", "inputs", "method", "num_outputs", "program")

    def __init__(self, data: bytes, inputs: tuple[tuple[Any, tuple[int, ...]], ...] | None, num_outputs: Any) -> None:
        self.data, self.program, self.method = data, None, None
        #: (numpy dtype, or the ScalarType's name when numpy has none; shape) of each input, when known
        #: before the method is loaded (from the metadata: :func:`_inputs`); else :meth:`take_method`
        #: asks the method
        self.inputs = inputs
        self.num_outputs = num_outputs if inputs is not None else None
        self.from_numpy = _torch().from_numpy

    def take_method(self, program: Any, method: Any) -> None:
        """Keep the loaded program and method; ask the method for its inputs when the metadata did
        not say (a blob from before the compiler recorded them)."""
        self.program, self.method = program, method
        if self.num_outputs is None:
            meta = method.method_meta()
            self.inputs = _converted([(meta.input_tensor_meta(i).dtype(), meta.input_tensor_meta(i).sizes())
                                      for i in range(meta.num_inputs())])
            self.num_outputs = meta.num_outputs()


def _converted(specs: Sequence[tuple[int, Sequence[int]]]) -> tuple[tuple[Any, tuple[int, ...]], ...]:
    """``(ScalarType code, sizes)`` pairs as :attr:`_Delegate.inputs` holds them."""
    out = []
    for code, sizes in specs:
        name = _SCALAR_TYPES.get(code, f"ScalarType {code}")
        out.append((np.dtype(name) if name in _NUMPY_TYPES else name, tuple(sizes)))
    return tuple(out)


def _inputs(metadata: Mapping[str, Any]) -> tuple[tuple[tuple[Any, tuple[int, ...]], ...] | None, Any]:
    """``(inputs, num_outputs)`` for a :class:`_Delegate` from the delegate's metadata; ``(None,
    None)`` when it does not say (then the method is asked). Derived once per read-only manifest
    list (docs/plugins.md: a recorded file opened again unchanged gives the same objects)."""
    specs, count = metadata.get("input_specs"), metadata.get("num_outputs")
    known = _KNOWN_SPECS.get(id(specs))
    if known is not None and known[0] is specs and known[2] == count:
        return known[1], count
    checked = _input_specs(metadata)
    inputs = _converted(checked) if checked is not None and type(count) is int else None
    if isinstance(specs, ManifestList):  # the core's read-only list: it cannot change
        if len(_KNOWN_SPECS) >= 64:
            _KNOWN_SPECS.pop(next(iter(_KNOWN_SPECS)), None)
        _KNOWN_SPECS[id(specs)] = (specs, inputs, count)  # holds specs: its id names no other object
    return inputs, count


#: :func:`_inputs`' answers by the id of a manifest's read-only ``input_specs`` list
_KNOWN_SPECS: dict[int, tuple[Any, Any, Any]] = {}


def _input_specs(metadata: Mapping[str, Any]) -> list[tuple[int, list[int]]] | None:
    """The method's inputs as the compiler recorded them in the delegate's metadata (``input_specs``:
    ``[ScalarType code, sizes]`` each, read from the emitted program), or ``None`` when absent or
    malformed (then the method is asked). Metadata is untrusted like the blob: should it disagree
    with the program, ExecuTorch refuses the inputs when the delegate runs (``Method::set_input``
    checks count, dtype and sizes), and the probe of an unknown blob runs it with the program's
    call inputs first."""
    specs = metadata.get("input_specs")
    if not isinstance(specs, list) or len(specs) > _MAX_INPUTS:  # the manifest's read-only lists are lists
        return None
    out = []
    for spec in specs:
        if (not isinstance(spec, list) or len(spec) != 2 or type(spec[0]) is not int or not isinstance(spec[1], list)
                or len(spec[1]) > _MAX_RANK or not all(type(d) is int and d >= 0 for d in spec[1])):
            return None
        out.append((spec[0], spec[1]))
    return out


_MAX_INPUTS, _MAX_RANK = 1 << 16, 64


_NEEDED = ("_load_program_from_buffer", "_get_registered_backend_names", "_unsafe_reset_threadpool",
           "_threadpool_get_thread_count", "Verification")


def _load_binding() -> Any:
    """ExecuTorch's runtime extension module (see the module docstring)."""
    import torch  # noqa: F401  -- loads libtorch for the binding; its tensors are torch tensors

    try:
        from executorch.extension.pybindings import _C

        if all(hasattr(_C, name) for name in _NEEDED):
            return _C
    except ImportError:
        pass
    import executorch.extension.pybindings.portable_lib as binding  # the public path (imports exir)

    return binding


class XnnpackRuntime(Runtime):
    """Loads and runs blobs made by :class:`handoff_xnnpack.compiler.XnnpackCompiler`.

    Reentrant: ExecuTorch's process-wide thread pool is guarded by one lock of this module, and a
    delegate's outputs are fresh tensors the binding copied out of the program's memory (hence
    :attr:`fresh_outputs`)."""

    reentrant = True
    #: ExecuTorch 1.5.1's ``Method.__call__`` clones every output tensor out of the program's
    #: planned memory (pybindings ``get_outputs_as_py_list``, ``clone_outputs=True``), so each
    #: ``Tensor.numpy()`` returned is a new array that no later call writes to.
    fresh_outputs = True
    #: ExecuTorch aborts the process on some malformed programs (an ET_LOG message holding invalid
    #: UTF-8 while its binding redirects logging to Python: pybind11 throws inside a noexcept path).
    isolate_untrusted = True

    def __init__(self) -> None:
        self._binding: Any = None
        self._has_backend = False  # the binding registered XnnpackBackend (asked once: it cannot unregister)

    # -- availability -------------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        if self._has_backend:  # asked on every load; a registered backend stays registered
            return True, ""
        version = _executorch_version()
        if version is None:
            return False, f"executorch not installed: {_INSTALL}"
        try:
            names = list(self._get_binding()._get_registered_backend_names())
        except Exception as exc:
            return False, f"ExecuTorch {version} runtime cannot be loaded: {one_line(exc)}"
        if _BACKEND not in names:
            return False, (f"ExecuTorch {version} runtime has no {_BACKEND} (registered: "
                           f"{', '.join(names) or 'none'}); {_INSTALL}")
        self._has_backend = True
        return True, ""

    def _get_binding(self) -> Any:
        if self._binding is None:
            self._binding = _load_binding()
        return self._binding

    # -- threads --------------------------------------------------------------------------------
    def _set_threads(self, threads: int | None) -> None:
        if threads is None:
            return
        binding = self._get_binding()
        current = binding._threadpool_get_thread_count()
        if threads == current:
            return
        if _LIVE[0]:
            raise ValueError(f"xnnpack: threads={threads} requested, but {_LIVE[0]} XNNPACK delegate(s) are "
                             f"loaded on ExecuTorch's process-wide pool of {current} threads, which cannot be "
                             "resized under them; use one thread count per process")
        binding._unsafe_reset_threadpool(threads)

    def threads(self) -> int:
        """The size of ExecuTorch's thread pool (loads the runtime)."""
        return int(self._get_binding()._threadpool_get_thread_count())

    # -- delegates ------------------------------------------------------------------------------
    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> _Delegate:
        version = _executorch_version()
        if version is None:
            raise ValueError(f"xnnpack: executorch not installed: {_INSTALL}")
        named = blob_key(blob)  # a recorded file's blob, named by the core
        place = named if named is not None else _place(blob)
        kept = _PTES.get(place) if place is not None else None
        if kept is not None:
            pte = kept[1]
        else:
            header, view = _format.unpack(blob)
            _format.check_compatible(header, version)
            pte = bytes(view)  # the binding wants bytes
            if place is not None:
                _keep(place, None if named is not None else blob.obj, pte)
        threads = options.get("threads")
        if threads is None and metadata.get("threads") is not None:  # the compile-time default, from the file
            threads = _format.OPTIONS["threads"].parse("threads", metadata["threads"])
        binding = self._get_binding()
        if not self._has_backend:
            if _BACKEND not in binding._get_registered_backend_names():
                raise RuntimeError(f"xnnpack: ExecuTorch {version} runtime has no {_BACKEND}; {_INSTALL}")
            self._has_backend = True
        # Everything that does not need the loaded method is done before ExecuTorch loads it, so
        # that a first run follows load_method closely (the pool's workers still awake).
        handle = _Delegate(pte, *_inputs(metadata))
        with _POOL_LOCK:
            self._set_threads(threads)
            try:
                program = binding._load_program_from_buffer(
                    handle.data, enable_etdump=False, debug_buffer_size=0,
                    program_verification=binding.Verification.InternalConsistency, data_path=None)
                handle.take_method(program, program.load_method("forward"))
            except MemoryError as exc:  # a size field read from the blob (found by fuzzing)
                raise ValueError(f"xnnpack: ExecuTorch could not allocate what this program asks for "
                                 f"({one_line(exc)}): the blob is damaged or not an xnnpack program of this "
                                 f"release; partition the model again") from exc
            _LIVE[0] += 1
        return handle

    def execute(self, handle: _Delegate, inputs: Sequence[Any]) -> list[Any]:
        expected = handle.inputs
        if len(inputs) != len(expected):
            raise ValueError(f"xnnpack: delegate takes {len(expected)} inputs, got {len(inputs)}")
        from_numpy = handle.from_numpy  # the binding takes and returns torch.Tensor only
        tensors = []
        for i, (array, (dtype, shape)) in enumerate(zip(inputs, expected)):
            if type(array) is not np.ndarray:
                array = np.asarray(array)
            if (array.dtype is not dtype and array.dtype != dtype) or array.ndim != len(shape):
                raise ValueError(f"xnnpack: input {i} is {array.dtype}{list(array.shape)}, the delegate expects "
                                 f"{dtype}{list(shape)}")
            flags = array.flags
            if not (flags.c_contiguous and flags.writeable):
                array = np.array(array, order="C")  # torch.from_numpy wants a writable, dense array
            tensors.append(from_numpy(array))
        with _POOL_LOCK:
            try:
                outputs = handle.method(tensors)
            except RuntimeError as exc:
                raise RuntimeError(f"xnnpack: ExecuTorch failed to run the delegate: {one_line(exc)} "
                                   f"(inputs {[list(t.shape) for t in tensors]}, expected "
                                   f"{[list(s) for _, s in expected]})") from exc
        # Tensor.numpy() shares the tensor's memory: the binding has copied it out of the program's
        # planned memory already, so nothing else writes to it.
        tensor = _torch().Tensor
        return [out.numpy() if isinstance(out, tensor) else np.asarray(out) for out in outputs]

    def release(self, handle: _Delegate) -> None:
        with _POOL_LOCK:
            if handle.method is not None:
                handle.method = handle.program = handle.data = None
                _LIVE[0] -= 1


#: The .pte bytes of blobs the core names (``handoff.blob_key``: a file recorded and unchanged)
#: or that were views of immutable ``bytes`` (a program given as the same bytes again), by that
#: key or by where the blob lies (:func:`_place`), with those bytes, which are kept alive here so
#: that their id names no other object (``None`` for a named blob): a later load of the same blob
#: neither unpacks, checks nor copies it again (a 13 MB MobileNetV2 ``.pte``: the copy and its
#: page faults were most of what a load took beyond ExecuTorch's own).
_PTES: dict[tuple[Any, ...], tuple[bytes | None, bytes]] = {}
#: The most bytes :data:`_PTES` holds (the bytes viewed and the copies), the newest kept first: a
#: program given as bytes over and over must not pile up copies.
_KEEP_BYTES = 16 << 20


def _keep(place: tuple[Any, ...], source: bytes | None, pte: bytes) -> None:
    if len(source or b"") + len(pte) > _KEEP_BYTES:
        return
    _PTES[place] = (source, pte)
    held = 0
    for key, (viewed, copy) in list(reversed(_PTES.items())):
        held += len(viewed or b"") + len(copy)
        if held > _KEEP_BYTES:
            _PTES.pop(key, None)  # another thread's load may have dropped it already


def _place(blob: memoryview) -> tuple[int, int, int] | None:
    """``(id, address, length)`` of ``blob`` in the immutable ``bytes`` it views (a bytes object
    never moves, and :data:`_PTES` keeps it alive); None for any other buffer (a mapping, a
    bytearray: their contents may change under the same address)."""
    source = blob.obj
    if type(source) is not bytes or not blob.nbytes:
        return None
    return id(source), np.frombuffer(blob, np.uint8).ctypes.data, blob.nbytes


@functools.cache
def _torch() -> Any:
    """torch, imported on first use (by then loading a delegate has imported it)."""
    import torch

    return torch


@functools.cache
def _executorch_version() -> str | None:
    """The installed ExecuTorch release (looked up once: reading package metadata costs ~1 ms)."""
    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return None

