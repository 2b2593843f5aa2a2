"""The runtime half of the ``vulkan`` backend: replays a delegate's launch plan through wgpu.

Imports neither torch nor TVM, and wgpu only inside the methods. Per delegate, :meth:`load`
creates everything once: the weights' buffers (uploaded from the mapped program file), one
buffer per input and per intermediate storage, one compute pipeline per kernel, and one bind group
per dispatch (scalar arguments live in one uniform buffer written at load: shapes are static).

Outputs stay on the GPU. :meth:`execute` writes numpy inputs with ``queue.write_buffer``, copies
inputs that another delegate on the same device left on the GPU (:class:`GpuValue`) with
``copy_buffer_to_buffer``, records the dispatches and submits them in growing parts (runtime
option ``first_submit``: 8, then 16, 32, ... dispatches, each part one compute pass and one
submission, so the GPU runs one part while the host records the next), and returns without
waiting: its outputs are :class:`GpuValue` ranges of its own buffers, which the next
vulkan delegate reads on the GPU (the queue orders the work, so consecutive delegates never wait
for each other). :meth:`to_host` reads any number of values back at once: one staging copy each
into the device's readback buffer, one submit, one map. The memory domain
(:meth:`VulkanRuntime.memory`) is the wgpu device: ``"wgpu:<adapter name>"``.

Not reentrant: a delegate's outputs live in its buffers, which its next call overwrites, so the
core runs one call per delegate at a time and keeps its lock until those outputs are consumed.

One wgpu device is shared by every delegate of the process that asks for the same adapter (and
the same ``timestamps`` setting, which needs a device feature), whichever :class:`VulkanRuntime`
(plugin manager) loads it: only the first load pays for creating the device.

Every load is timed in phases (:data:`LOAD_PHASES`, ``stats()["load_seconds"]``), so a slow load
says where it went: on a GPU, the driver compiling the pipelines (drivers keep their own on-disk
cache, Mesa's under ``XDG_CACHE_HOME``, so a later process compiles less).

Environment: ``WGPU_BACKEND_TYPE`` defaults to ``Vulkan``; ``XDG_RUNTIME_DIR`` to
``$HANDOFF_HOME/xdg-runtime`` (mode 0700) and ``XDG_CACHE_HOME`` to ``$HANDOFF_HOME/cache`` (Mesa's
drivers write their shader cache there) when unset.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from handoff import Runtime

from . import WGPU_VERSION
from ._format import UNIFORM_SLOT, fold_grid, uniform_bytes, unpack

INSTALL_HINT = f"pip install wgpu=={WGPU_VERSION}"
DRIVER_HINT = ("install a Vulkan driver and loader (Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1 "
               "gives lavapipe, a CPU implementation; a GPU vendor's driver for real hardware)")
#: Phases of a run timed on the host with ``timestamps=1``: write the inputs and record the
#: commands, and submit (in ``execute``); wait for the GPU and map the readback buffer, and copy
#: the outputs out (in the ``to_host`` that read this delegate's outputs).
_PHASES = ("write_and_encode", "submit", "wait_and_map", "read")
#: Phases of a load, always timed: getting the wgpu device (0 when an earlier load in this process
#: created it), the kernels' shader modules (wgpu parses and validates the WGSL), their compute
#: pipelines (translated to SPIR-V and compiled by the driver), the buffers with the weights
#: queued for upload (they reach the GPU with the first submission), and the bind groups with
#: the dispatches' uniforms.
LOAD_PHASES = ("device", "shader_modules", "pipelines", "buffers", "bind_groups")
#: Adapter types in the order ``adapter`` (unset) prefers them.
_PREFERENCE = ("DiscreteGPU", "IntegratedGPU", "VirtualGPU", "CPU", "Unknown")

_env_lock = threading.Lock()
#: The process's wgpu devices, shared by every VulkanRuntime: (adapter name, timestamps) -> device.
_devices: dict[tuple[str, bool], "_Device"] = {}
_chosen: dict[str, Any] = {}  # the adapter option, lowercased -> adapter
_devices_lock = threading.Lock()
#: The C types wgpu-py 0.32 first asks cffi for during a run (encoder, compute pass, command
#: buffer, submit, map callback), and with ``timestamps=1``. cffi parses each new type string once
#: per process with pycparser, re-reading every typedef of wgpu's header: about 100 ms for these on
#: an H200 machine's host, which made a process's first run 1.3 ms -> 168 ms. :func:`_warm_run_types`
#: parses them on a thread while the first load compiles its pipelines.
_RUN_CTYPES = ("WGPUCommandEncoderDescriptor *", "WGPUComputePassDescriptor *", "WGPUCommandBufferDescriptor *",
               "WGPUCommandBuffer[]", "void(WGPUMapAsyncStatus, WGPUStringView, void *, void *)",
               "WGPUBufferMapCallbackInfo *", "intptr_t")
_TIMESTAMP_CTYPES = ("WGPUPassTimestampWrites *",)
_warmups: dict[bool, threading.Thread] = {}  # timestamps -> the thread that parsed the run's C types


def prepare_environment() -> None:
    """Set what wgpu and Mesa need, unless the user already did (see the module docstring)."""
    with _env_lock:
        os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")
        from handoff import cache_dir

        # One directory reused by every process (a fresh temporary one per process was never
        # removed); nothing is written there (the drivers only probe for a display server).
        for variable, name, mode in (("XDG_RUNTIME_DIR", "xdg-runtime", 0o700), ("XDG_CACHE_HOME", "cache", None)):
            if not os.environ.get(variable):
                try:
                    path = cache_dir(name)
                    if mode is not None:
                        os.chmod(path, mode)
                    os.environ[variable] = str(path)
                except OSError:  # an unwritable HANDOFF_HOME: Mesa keeps no shader cache, the probe warns
                    pass


def import_wgpu() -> Any:
    prepare_environment()
    import wgpu

    return wgpu


def _adapter_name(adapter: Any) -> str:
    info = adapter.info
    return f"{info.get('device', '')} [{info.get('backend_type', '')}, {info.get('adapter_type', '')}]"


def vulkan_adapters(wgpu: Any) -> list[Any]:
    """Vulkan adapters, most preferred first (discrete, integrated, virtual, CPU)."""
    found = [a for a in wgpu.gpu.enumerate_adapters_sync() if a.info.get("backend_type") == "Vulkan"]
    rank = {t: i for i, t in enumerate(_PREFERENCE)}
    return sorted(found, key=lambda a: rank.get(a.info.get("adapter_type"), len(rank)))


def choose_adapter(adapters: Sequence[Any], wanted: str | None) -> Any:
    if not adapters:
        raise RuntimeError(f"no Vulkan adapter found: {DRIVER_HINT}")
    if not wanted:
        return adapters[0]
    for adapter in adapters:
        info = adapter.info
        text = " ".join(str(info.get(k, "")) for k in ("device", "vendor", "description", "adapter_type")).lower()
        if wanted.lower() in text:
            return adapter
    names = "; ".join(_adapter_name(a) for a in adapters)
    raise ValueError(f"option adapter={wanted!r} matches no Vulkan adapter; adapters here: {names}")


@dataclasses.dataclass(eq=False)
class _Device:
    wgpu: Any
    adapter: Any
    device: Any
    queue: Any
    name: str
    limits: dict[str, int]
    timestamps: bool
    features: frozenset[str]  # the device's WebGPU features (shader-f16 where the adapter has it)
    memory: str  # the memory domain of its delegates' outputs
    readback_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # guards what follows
    staging: Any = None  # the MAP_READ buffer every readback goes through, grown on demand
    staging_size: int = 0
    pending: dict[Any, None] = dataclasses.field(default_factory=dict)  # delegates whose timestamps are unread


class GpuValue:
    """A delegate output left on the GPU: ``nbytes`` bytes at ``offset`` of ``buffer``, holding a
    C-order array of ``shape`` and ``dtype``. Valid until its delegate runs again (the core holds
    the delegate's lock until then)."""

    __slots__ = ("buffer", "dtype", "nbytes", "offset", "owner", "shape")

    def __init__(self, owner: "_Delegate", buffer: Any, offset: int, nbytes: int, shape: tuple[int, ...],
                 dtype: np.dtype) -> None:
        self.owner, self.buffer, self.offset, self.nbytes, self.shape, self.dtype = owner, buffer, offset, nbytes, shape, dtype

    def __repr__(self) -> str:
        return f"GpuValue({self.dtype}{list(self.shape)} on {self.owner.dev.name})"


@dataclasses.dataclass(eq=False)
class _Delegate:
    """What ``load`` returns; everything ``execute`` needs, created once."""

    dev: _Device
    buffers: list[Any]
    inputs: list[tuple[int, tuple[int, ...], np.dtype]]  # (buffer, shape, dtype) per input
    outputs: list[GpuValue]  # what every execute returns: its output ranges
    passes: list[tuple[Any, Any, tuple[int, int, int]]]  # (pipeline, bind group, workgroups) per dispatch
    uniform: Any
    raw: list[tuple[Any, ...]] | None = None  # native handles of ``passes`` (see _record)
    #: ``(passes, raw)`` slices, one per queue submission of a run (see :func:`_submissions`)
    chunks: list[tuple[list[Any], list[Any] | None]] = dataclasses.field(default_factory=list)
    query_set: Any = None
    query_buffer: Any = None
    submits: int = 0
    last_gpu_seconds: float | None = None  # with timestamps=1: the last run's compute pass on the GPU
    last_host_seconds: dict[str, float] | None = None  # with timestamps=1: the last run's phases (_PHASES)
    load_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # LOAD_PHASES
    keep: list[Any] = dataclasses.field(default_factory=list)


class VulkanRuntime(Runtime):
    """Runs vulkan delegates through wgpu (see :class:`handoff.Runtime`)."""

    reentrant = False

    # -- availability ----------------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        try:
            wgpu = import_wgpu()
        except ImportError as exc:
            return False, f"wgpu cannot be imported ({' '.join(str(exc).split())}): {INSTALL_HINT}"
        except Exception as exc:  # a broken install (missing wgpu-native library)
            return False, f"wgpu cannot be loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): {INSTALL_HINT}"
        try:
            adapters = vulkan_adapters(wgpu)
        except Exception as exc:
            return False, f"wgpu cannot enumerate adapters ({' '.join(str(exc).split())[:200]}): {DRIVER_HINT}"
        if not adapters:
            return False, f"no Vulkan adapter found by wgpu {getattr(wgpu, '__version__', '?')}: {DRIVER_HINT}"
        return True, ""

    # -- device ----------------------------------------------------------------------------------
    def _device(self, options: Mapping[str, str]) -> _Device:
        wanted = (options.get("adapter") or "").strip()
        timestamps = bool(options.get("timestamps"))
        with _devices_lock:
            wgpu = import_wgpu()
            # Keyed by the adapter, not the option's spelling: delegates on one adapter share a
            # device, so their values can pass between them on the GPU.
            if wanted.lower() not in _chosen:
                _chosen[wanted.lower()] = choose_adapter(vulkan_adapters(wgpu), wanted or None)
            adapter = _chosen[wanted.lower()]
            key = (_adapter_name(adapter), timestamps)
            if key in _devices:
                return _devices[key]
            features = []
            if timestamps:
                if "timestamp-query" not in adapter.features:
                    raise ValueError(f"option timestamps=1: adapter {_adapter_name(adapter)} has no timestamp-query feature")
                features.append("timestamp-query")
            if _F16 in adapter.features:  # float16 kernels need it; asked for whenever the adapter has it
                features.append(_F16)
            # wgpu-py requests the adapter's own limits when none are given: the most it allows.
            device = adapter.request_device_sync(required_features=features, label="handoff-vulkan")
            name = _adapter_name(adapter)
            dev = _Device(wgpu, adapter, device, device.queue, name, dict(device.limits), timestamps, frozenset(features),
                          f"wgpu:{name}" + (" +timestamps" if timestamps else ""))
            _devices[key] = dev
            _warm_run_types(timestamps)
            return dev

    # -- load ------------------------------------------------------------------------------------
    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> _Delegate:
        header, data = unpack(blob)
        start = time.perf_counter()
        dev = self._device(options)
        device_seconds = time.perf_counter() - start
        # The blob comes from a program file: a header field that is missing or of the wrong type,
        # or WGSL that wgpu refuses (found by tests/fuzz/fuzz_vulkan.py: a mutated kernel escaped
        # as wgpu's own GPUValidationError), is a corrupt blob, said in one line.
        try:
            # Both options arrive parsed with their Option's default filled in (the one place it is set).
            delegate = self._build(header, data, dev, options["load_threads"])
            delegate.chunks = _submissions(delegate.passes, delegate.raw, options["first_submit"])
        except dev.wgpu.GPUError as exc:
            raise ValueError(f"vulkan delegate blob is corrupt: wgpu refused it on {dev.name}: "
                             f"{' '.join(str(exc).split())[:300]}; re-partition the model") from None
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"vulkan delegate blob header is corrupt: {type(exc).__name__}: {exc}; "
                             f"re-partition the model") from None
        delegate.load_seconds = {"device": device_seconds, **delegate.load_seconds}
        return delegate

    def _build(self, header: Mapping[str, Any], data: memoryview, dev: _Device, threads: int) -> _Delegate:
        """The delegate's buffers, pipelines and dispatches on ``dev``, from a blob's header; the
        shader modules and pipelines are created by up to ``threads`` threads at once."""
        _check_limits(header["limits"], dev)
        if _F16 not in dev.features and any(_ENABLES_F16.search(k["wgsl"]) for k in header["kernels"]):
            raise ValueError(f"the delegate computes in float16 (WGSL 'enable f16'), and adapter {dev.name} has no "
                             f"{_F16} feature; choose another adapter (option vulkan.adapter) or partition the model "
                             f"in float32")
        wgpu, device = dev.wgpu, dev.device
        usage = wgpu.BufferUsage
        storage_usage = usage.STORAGE | usage.COPY_SRC | usage.COPY_DST

        clock = [time.perf_counter()]
        buffers = []
        for i, spec in enumerate(header["buffers"]):
            size = -(-int(spec["nbytes"]) // 4) * 4
            buf = device.create_buffer(size=size, usage=storage_usage, label=f"handoff-{spec['kind']}-{i}")
            if spec["kind"] == "weight":
                start, nbytes = spec["data"]
                dev.queue.write_buffer(buf, 0, _padded_bytes(data[start:start + nbytes]))
            buffers.append(buf)

        inputs = [(int(s["buffer"]), tuple(s["shape"]), np.dtype(s["dtype"])) for s in header["inputs"]]
        clock.append(time.perf_counter())

        # Kernels: one shader module and pipeline each; one bind group layout (and pipeline
        # layout) per distinct list of bindings, shared by the kernels that have it. wgpu's
        # device is thread-safe and its calls release the GIL, so with several threads the
        # driver can compile pipelines in parallel (what a load on a GPU mostly waits for).
        kernels = header["kernels"]
        shared: dict[tuple[str, ...], tuple[Any, Any]] = {}
        for k in kernels:
            bindings = tuple(k["bindings"])
            if bindings not in shared:
                entries = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE,
                            "buffer": {"type": wgpu.BufferBindingType.storage if access == "read_write"
                                       else wgpu.BufferBindingType.read_only_storage}}
                           for i, access in enumerate(bindings)]
                entries.append({"binding": len(bindings), "visibility": wgpu.ShaderStage.COMPUTE,
                                "buffer": {"type": wgpu.BufferBindingType.uniform}})
                layout = device.create_bind_group_layout(entries=entries)
                shared[bindings] = layout, device.create_pipeline_layout(bind_group_layouts=[layout])
        layouts = [shared[tuple(k["bindings"])][0] for k in kernels]

        def pipeline(k: Mapping[str, Any], module: Any) -> Any:
            return device.create_compute_pipeline(layout=shared[tuple(k["bindings"])][1],
                                                  compute={"module": module, "entry_point": k["name"]}, label=k["name"])

        with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(kernels))), "handoff-vulkan-load") as pool:
            modules = list(pool.map(lambda k: device.create_shader_module(code=k["wgsl"], label=k["name"]), kernels))
            clock.append(time.perf_counter())
            pipelines = list(pool.map(pipeline, kernels, modules))
        clock.append(time.perf_counter())

        # Dispatches: scalar arguments in one uniform buffer, one bind group each.
        dispatches = header["dispatches"]
        max_dim = int(dev.limits.get("max-compute-workgroups-per-dimension", 65535))
        uniform = device.create_buffer(size=max(UNIFORM_SLOT * len(dispatches), UNIFORM_SLOT),
                                       usage=usage.UNIFORM | usage.COPY_DST, label="handoff-uniforms")
        uniform_data = bytearray(UNIFORM_SLOT * len(dispatches))
        passes = []
        for i, d in enumerate(dispatches):
            k = int(d["kernel"])
            raw = uniform_bytes(d["pods"], int(d["grid"][0]))
            uniform_data[i * UNIFORM_SLOT:i * UNIFORM_SLOT + len(raw)] = raw
            entries = [{"binding": j, "resource": {"buffer": buffers[b], "offset": int(off), "size": -(-int(n) // 4) * 4}}
                       for j, (b, off, n) in enumerate(d["buffers"])]
            entries.append({"binding": len(d["buffers"]),
                            "resource": {"buffer": uniform, "offset": i * UNIFORM_SLOT, "size": len(raw)}})
            group = device.create_bind_group(layout=layouts[k], entries=entries)
            passes.append((pipelines[k], group, fold_grid(int(d["grid"][0]), int(d["grid"][1]), max_dim)))
        if dispatches:
            dev.queue.write_buffer(uniform, 0, uniform_data)
        clock.append(time.perf_counter())

        buffers_s, modules_s, pipelines_s, groups_s = np.diff(clock).tolist()
        delegate = _Delegate(dev, buffers, inputs, [], passes, uniform, raw=_native_passes(passes),
                             keep=[pipelines, layouts],
                             load_seconds={"shader_modules": modules_s, "pipelines": pipelines_s,
                                           "buffers": buffers_s, "bind_groups": groups_s})
        delegate.outputs = [GpuValue(delegate, buffers[int(s["buffer"])], int(s["offset"]), int(s["nbytes"]),
                                     tuple(s["shape"]), np.dtype(s["dtype"])) for s in header["outputs"]]
        if dev.timestamps:
            delegate.query_set = device.create_query_set(type=wgpu.QueryType.timestamp, count=2)
            delegate.query_buffer = device.create_buffer(size=16, usage=usage.QUERY_RESOLVE | usage.COPY_SRC)
        return delegate

    # -- run -------------------------------------------------------------------------------------
    def memory(self, handle: _Delegate) -> str:
        return handle.dev.memory

    def execute(self, handle: _Delegate, inputs: Sequence[Any]) -> list[GpuValue]:
        """Write or copy the inputs, record the dispatches, submit; return the output ranges
        without waiting for the GPU."""
        if len(inputs) != len(handle.inputs):
            raise ValueError(f"vulkan delegate takes {len(handle.inputs)} inputs, got {len(inputs)}")
        dev = handle.dev
        profile = handle.query_set is not None
        clock = [time.perf_counter()] if profile else None
        encoder = dev.device.create_command_encoder()
        for i, ((buf, shape, dtype), value) in enumerate(zip(handle.inputs, inputs)):
            if type(value) is GpuValue:
                if value.owner.dev is not dev:
                    raise ValueError(f"vulkan delegate input {i} is on another wgpu device ({value.owner.dev.memory}, "
                                     f"this delegate runs on {dev.memory})")
                if value.dtype != dtype or value.shape != shape:
                    raise ValueError(f"vulkan delegate input {i} expects {dtype}{list(shape)}, got "
                                     f"{value.dtype}{list(value.shape)}")
                if value.nbytes:
                    encoder.copy_buffer_to_buffer(value.buffer, value.offset, handle.buffers[buf], 0, _padded(value.nbytes))
                continue
            arr = np.asarray(value)
            if arr.dtype != dtype or arr.shape != shape:
                raise ValueError(f"vulkan delegate input {i} expects {dtype}{list(shape)}, got {arr.dtype}{list(arr.shape)}")
            # Queue writes happen before the commands submitted after them, so before this run's copies.
            dev.queue.write_buffer(handle.buffers[buf], 0, _padded_bytes(np.ascontiguousarray(arr)))
        # One compute pass per submission (the first also carries the input copies); the queue
        # runs them in order, so later dispatches still see what earlier ones wrote.
        last = len(handle.chunks) - 1
        for c, (passes, raw) in enumerate(handle.chunks):
            if c:
                encoder = dev.device.create_command_encoder()
            timestamp_writes = None
            if profile and c in (0, last):  # the span from the first pass's start to the last pass's end
                timestamp_writes = {"query_set": handle.query_set}
                if c == 0:
                    timestamp_writes["beginning_of_pass_write_index"] = 0
                if c == last:
                    timestamp_writes["end_of_pass_write_index"] = 1
            compute = encoder.begin_compute_pass(timestamp_writes=timestamp_writes)
            _record(compute, passes, raw)
            compute.end()
            if c < last:
                dev.queue.submit([encoder.finish()])
        if profile:
            encoder.resolve_query_set(handle.query_set, 0, 2, handle.query_buffer, 0)
        commands = encoder.finish()
        if profile:
            clock.append(time.perf_counter())
        dev.queue.submit([commands])
        handle.submits += len(handle.chunks)
        if profile:
            clock.append(time.perf_counter())
            handle.last_host_seconds = dict(zip(_PHASES, np.diff(clock).tolist()))
            with dev.readback_lock:  # its timestamps are read with the next readback on this device
                dev.pending[handle] = None
        return list(handle.outputs)  # the same ranges every call; a new list, so no caller can change them

    def to_host(self, values: Sequence[Any]) -> list[np.ndarray]:
        """Numpy copies of :class:`GpuValue` objects: per device, one copy of each into the
        readback buffer, one submit, one map (and, with ``timestamps=1``, the pending delegates'
        timestamps in the same readback)."""
        out: list[Any] = [None] * len(values)
        devices: dict[_Device, list[tuple[int, GpuValue]]] = {}
        for i, value in enumerate(values):
            if type(value) is not GpuValue:
                raise TypeError(f"vulkan to_host: value {i} is a {type(value).__name__}, not a GpuValue")
            devices.setdefault(value.owner.dev, []).append((i, value))
        for dev, items in devices.items():
            with dev.readback_lock:
                _read_back(dev, items, out)
        return out

    def stats(self, handle: _Delegate) -> dict[str, Any]:
        """The adapter, the load's phases (:data:`LOAD_PHASES`, seconds), submissions so far,
        and with the ``timestamps=1`` runtime option the last run's GPU time and host phases
        (known once its outputs, or a later delegate's on the same device, were read back)."""
        return {"adapter": handle.dev.name, "load_seconds": dict(handle.load_seconds), "submits": handle.submits,
                "gpu_seconds": handle.last_gpu_seconds, "host_seconds": handle.last_host_seconds}

    def release(self, handle: _Delegate) -> None:
        with handle.dev.readback_lock:
            handle.dev.pending.pop(handle, None)
        for buf in [*handle.buffers, handle.uniform, handle.query_buffer]:
            if buf is not None:
                try:
                    buf.destroy()
                except Exception:  # already gone with its device
                    pass
        if handle.query_set is not None:
            try:
                handle.query_set.destroy()
            except Exception:
                pass
        handle.buffers, handle.outputs, handle.passes, handle.raw, handle.keep = [], [], [], None, []


def _submissions(passes: list[Any], raw: list[Any] | None, first: int) -> list[tuple[list[Any], list[Any] | None]]:
    """``passes`` (and their native handles) cut into a run's submissions: ``first`` dispatches,
    then twice as many each time, so the GPU runs one part while the host records the next; one
    submission when ``first`` is 0 or covers them all (always at least one, for the input copies)."""
    if not first or first >= len(passes):
        return [(passes, raw)]
    chunks, start, size = [], 0, first
    while start < len(passes):
        end = start + size
        part = raw[start:end] if raw is not None else None
        if part and part[0][0] is None:  # each part is a new compute pass: it starts with no pipeline set
            part[0] = (passes[start][0]._internal, *part[0][1:])
        chunks.append((passes[start:end], part))
        start, size = end, 2 * size
    return chunks


def _padded_bytes(data: Any) -> Any:
    """``data`` (bytes-like) zero-padded to a multiple of 4 bytes, as queue writes must be (an odd
    number of float16 values is not)."""
    view = memoryview(data).cast("B")
    return view if not view.nbytes % 4 else bytes(view) + b"\0" * (-view.nbytes % 4)


def _padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of 4, as buffer sizes and copies must be."""
    return -(-nbytes // 4) * 4


def _read_back(dev: _Device, items: list[tuple[int, GpuValue]], out: list[Any]) -> None:
    """Copy ``items`` (index in ``out``, value) of one device into numpy arrays in ``out``, through
    the device's readback buffer; called with ``dev.readback_lock`` held."""
    placed, size = [], 0
    for i, value in items:
        placed.append((i, value, size))
        size += _padded(value.nbytes)
    pending = list(dev.pending) if dev.timestamps else []
    timestamps_at = size
    size += 16 * len(pending)
    if size == 0:  # only empty values
        for i, value, _ in placed:
            out[i] = np.empty(value.shape, value.dtype)
        return
    if dev.staging_size < size:
        if dev.staging is not None:
            dev.staging.destroy()
        dev.staging_size = max(size, 2 * dev.staging_size)  # grows to what a run needs, then stays
        dev.staging = dev.device.create_buffer(size=dev.staging_size, usage=dev.wgpu.BufferUsage.MAP_READ |
                                               dev.wgpu.BufferUsage.COPY_DST, label="handoff-readback")
    clock = time.perf_counter()
    encoder = dev.device.create_command_encoder()
    for _, value, at in placed:
        if value.nbytes:
            encoder.copy_buffer_to_buffer(value.buffer, value.offset, dev.staging, at, _padded(value.nbytes))
    for k, delegate in enumerate(pending):
        encoder.copy_buffer_to_buffer(delegate.query_buffer, 0, dev.staging, timestamps_at + 16 * k, 16)
    dev.queue.submit([encoder.finish()])
    # Mapping waits for the submission (wgpu polls the device); "READ_NOSYNC" skips the empty
    # extra submit wgpu-py would otherwise make before mapping a MAP_READ buffer.
    dev.staging.map_sync("READ_NOSYNC", 0, size)
    mapped = time.perf_counter()
    try:  # a view of the mapped memory: each value is copied out once, before unmapping
        raw = dev.staging.read_mapped(0, size, copy=False)
        for i, value, at in placed:
            out[i] = np.frombuffer(raw, dtype=value.dtype, count=value.nbytes // value.dtype.itemsize,
                                   offset=at).reshape(value.shape).copy()
        ticks = np.frombuffer(raw, dtype=np.uint64, count=2 * len(pending), offset=timestamps_at).tolist()
    finally:  # unmapping releases the view
        dev.staging.unmap()
    if dev.timestamps:
        period = _timestamp_period(dev) * 1e-9
        for k, delegate in enumerate(pending):
            delegate.last_gpu_seconds = float(ticks[2 * k + 1] - ticks[2 * k]) * period
            dev.pending.pop(delegate, None)
        phases = {"wait_and_map": mapped - clock, "read": time.perf_counter() - mapped}
        for delegate in {value.owner for _, value in items}:
            if delegate.last_host_seconds is not None:
                delegate.last_host_seconds.update(phases)


def _record(compute: Any, passes: list[tuple[Any, Any, tuple[int, int, int]]], raw: list[tuple[Any, ...]] | None) -> None:
    """Record the dispatches: set_pipeline (when it changes), set_bind_group, dispatch_workgroups.

    With wgpu-native, ``raw`` holds the native handles and the three calls go straight to the C
    API (half the encoding time of the Python wrappers, which re-check arguments and keep objects
    alive that the delegate keeps alive anyway); errors still surface at ``finish()``."""
    if raw is not None:
        from wgpu.backends.wgpu_native._ffi import ffi, lib

        handle = compute._internal
        set_pipeline, set_group = lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup
        dispatch, null = lib.wgpuComputePassEncoderDispatchWorkgroups, ffi.NULL
        for pipeline, group, x, y, z in raw:
            if pipeline is not None:
                set_pipeline(handle, pipeline)
            set_group(handle, 0, group, 0, null)
            dispatch(handle, x, y, z)
        return
    last = None
    for pipeline, group, (x, y, z) in passes:
        if pipeline is not last:
            compute.set_pipeline(pipeline)
            last = pipeline
        compute.set_bind_group(0, group)
        compute.dispatch_workgroups(x, y, z)


def _warm_run_types(timestamps: bool) -> None:
    """Have cffi parse the C types of a run (:data:`_RUN_CTYPES`) on a daemon thread, once per
    process: pycparser holds the GIL, but the load's pipeline compilation (native) does not, so the
    two overlap instead of the parsing landing on the first run."""
    if timestamps in _warmups:
        return
    names = _RUN_CTYPES + (_TIMESTAMP_CTYPES if timestamps else ())

    def parse() -> None:
        try:
            from wgpu.backends.wgpu_native._ffi import ffi
        except Exception:  # not wgpu-native: nothing to warm
            return
        for name in names:
            try:
                ffi.typeof(name)
            except Exception:  # another wgpu release names it differently: parsed when used instead
                pass

    thread = _warmups[timestamps] = threading.Thread(target=parse, name="handoff-vulkan-ctypes", daemon=True)
    thread.start()


def _native_passes(passes: list[tuple[Any, Any, tuple[int, int, int]]]) -> list[tuple[Any, ...]] | None:
    """The native handles of ``passes`` for :func:`_record`, or None when wgpu is not wgpu-native."""
    try:
        from wgpu.backends.wgpu_native._ffi import lib

        lib.wgpuComputePassEncoderDispatchWorkgroups  # noqa: B018 - present in this wgpu-native?
        raw, last = [], None
        for pipeline, group, (x, y, z) in passes:
            raw.append((pipeline._internal if pipeline is not last else None, group._internal, x, y, z))
            last = pipeline
        return raw
    except Exception:
        return None


def _timestamp_period(dev: _Device) -> float:
    try:
        from wgpu.backends.wgpu_native._api import libf

        return float(libf.wgpuQueueGetTimestampPeriod(dev.queue._internal))
    except Exception:  # not wgpu-native: WebGPU timestamps are nanoseconds
        return 1.0


#: Limit names of the blob header -> wgpu's names.
_LIMITS = {
    "max_storage_buffers_per_shader_stage": "max-storage-buffers-per-shader-stage",
    "max_storage_buffer_binding_size": "max-storage-buffer-binding-size",
    "max_buffer_size": "max-buffer-size",
    "max_compute_invocations_per_workgroup": "max-compute-invocations-per-workgroup",
    "max_compute_workgroup_size_x": "max-compute-workgroup-size-x",
    "max_compute_workgroup_size_y": "max-compute-workgroup-size-y",
    "max_compute_workgroup_size_z": "max-compute-workgroup-size-z",
}


_F16 = "shader-f16"
#: A WGSL module that uses f16 anywhere must say so first.
_ENABLES_F16 = re.compile(r"^\s*enable\s+f16\s*;", re.M)


#: Limits a partition-time option keeps a blob within -> that option.
_LIMIT_OPTIONS = {
    "max_storage_buffers_per_shader_stage": "max_storage_buffers",
    "max_storage_buffer_binding_size": "max_storage_buffer_binding_size",
    "max_buffer_size": "max_storage_buffer_binding_size",
}


def _check_limits(needed: Mapping[str, int], dev: _Device) -> None:
    for name, wgpu_name in _LIMITS.items():
        have = dev.limits.get(wgpu_name)
        if have is not None and int(needed.get(name, 0)) > int(have):
            option = _LIMIT_OPTIONS.get(name)
            hint = (f"; partition again with --option vulkan.{option}={have} so that what exceeds it goes to "
                    f"another backend" if option else "")
            raise ValueError(f"the delegate needs {wgpu_name} >= {needed[name]}, adapter {dev.name} allows {have}{hint}")


__all__ = ["LOAD_PHASES", "GpuValue", "VulkanRuntime", "choose_adapter", "prepare_environment", "vulkan_adapters"]
