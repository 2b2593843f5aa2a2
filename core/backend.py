"""The backend contract: what a plugin hands the core for each backend it provides.

A plugin's ``handoff_backends`` hook returns :class:`BackendSpec` objects. A spec is cheap: it
names the backend, declares its typed options (:class:`Option`) and the plugin-API version it
was built for, and points, by import path, at its two halves:

* the **compiler** (ahead of time; may import torch and the vendor compiler): a subclass of
  :class:`Compiler`, which must implement capability (``support``) and lowering
  (``preprocess``); every other method has a default;
* the **runtime** (on the device; must import without torch or the vendor compiler): a subclass
  of :class:`Runtime`, which must implement ``load`` and ``execute``.

Neither half is imported until it is needed, so ``import handoff.runtime`` and ``handoff backends``
stay fast, and a program needing only XNNPACK never imports TVM.

Vocabulary follows ExecuTorch: a *partition* is a connected, acyclic set of graph nodes claimed by
one backend; *preprocess* lowers it to a *delegate blob*; the *compile spec* is the options dict.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Mapping, Sequence

#: The plugin API this core implements, ``MAJOR.MINOR``. A plugin built for the same major and a
#: minor up to this one works; anything else is listed as broken with the reason.
PLUGIN_API_VERSION = "2.0"
#: Device classes a backend may declare (``registry.yaml`` uses the same words).
DEVICE_CLASSES = ("cpu", "gpu", "npu")
#: Option types :class:`Option` parses.
OPTION_TYPES = ("str", "int", "float", "bool", "choice")
#: The memory domain of numpy arrays in host memory (see :meth:`Runtime.memory`).
HOST_MEMORY = "host"

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Option:
    """One typed backend option. The core parses and checks values (from the command line they
    are strings) before a compiler or runtime sees them, and fills in the default.

    :param type: ``"str"``, ``"int"``, ``"float"``, ``"bool"`` (``1/0``, ``true/false``,
        ``yes/no``, ``on/off``) or ``"choice"`` (one of ``choices``).
    :param help: one line for ``handoff backends``.
    :param default: the value when the option is not given (``None``: the backend decides).
    :param choices: the valid values of a ``"choice"`` option.
    :param min, max: inclusive range of an ``"int"`` or ``"float"`` option; also the documented
        cap of a runtime option that a program file must not be able to exceed.
    :param aliases: extra spellings accepted for an int option meaning its default, e.g. ``("auto",)``.
    :param compare: values worth comparing (``handoff compare --strategies auto`` tries each).
    """

    type: str = "str"
    help: str = ""
    default: Any = None
    choices: Sequence[str] = ()
    min: float | None = None
    max: float | None = None
    aliases: Sequence[str] = ()
    compare: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option type {self.type!r} is not one of {', '.join(OPTION_TYPES)}")
        if self.type == "choice" and not self.choices:
            raise ValueError("a 'choice' option needs choices")

    def valid(self) -> str:
        """The valid values, in words, for messages and ``handoff backends``."""
        if self.type == "choice":
            return ", ".join(map(str, self.choices))
        if self.type == "bool":
            return "1, 0 (or true/false, yes/no, on/off)"
        if self.type in ("int", "float"):
            lo = "" if self.min is None else f">= {_num(self.min)}"
            hi = "" if self.max is None else f"<= {_num(self.max)}"
            words = f"{'an integer' if self.type == 'int' else 'a number'} {' and '.join(p for p in (lo, hi) if p)}"
            return words.strip() + "".join(f", or '{a}'" for a in self.aliases)
        return "any text"

    def parse(self, name: str, value: Any) -> Any:
        """``value`` (a string from the command line, or an already typed value) as this option's
        type; ``ValueError`` with a one-line message naming the valid values otherwise."""
        if value is None:
            return self.default
        text = str(value).strip()

        def bad() -> ValueError:
            return ValueError(f"option {name}={value!r} is not valid; valid values: {self.valid()}")

        if self.type == "str":
            return text
        if self.type == "choice":
            for choice in self.choices:
                if text.lower() == str(choice).lower():
                    return choice
            raise bad()
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise bad()
        if text.lower() in (a.lower() for a in self.aliases):
            return self.default
        try:
            number: float = int(text) if self.type == "int" else float(text)
        except ValueError:
            raise bad() from None
        if isinstance(value, float) and self.type == "int" and not value.is_integer():
            raise bad()
        if (self.type == "float" and not math.isfinite(number)) or (self.min is not None and number < self.min) \
                or (self.max is not None and number > self.max):
            raise bad()
        return number


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _as_option(value: Option | str) -> Option:
    return value if isinstance(value, Option) else Option(help=str(value))


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One backend, as a plugin declares it.

    :param id: stable, lowercase identifier used on the command line and in program files.
    :param version: the plugin's version; written into every delegate it produces.
    :param compiler: ``"module:Class"`` of the ahead-of-time half, a :class:`Compiler` subclass.
    :param runtime: ``"module:Class"`` of the runtime half, a :class:`Runtime` subclass.
    :param device: one of :data:`DEVICE_CLASSES`.
    :param description: one line for ``handoff backends``.
    :param options: every compile option the backend accepts (``handoff partition --option
        ID.NAME=VALUE``), name -> :class:`Option` (a plain string is short for a text option with
        that help). The core refuses any other name, listing these, and parses the values.
    :param runtime_options: likewise for run time (``handoff run --option``, ``handoff.load(...,
        options=)``), e.g. a thread count. Give numeric ones a ``max``: it is the documented cap.
    :param api_version: the plugin API (:data:`PLUGIN_API_VERSION`) the plugin was built for.
    """

    id: str
    version: str
    compiler: str
    runtime: str
    device: str = "cpu"
    description: str = ""
    options: Mapping[str, Option | str] = dataclasses.field(default_factory=dict, hash=False)
    runtime_options: Mapping[str, Option | str] = dataclasses.field(default_factory=dict, hash=False)
    api_version: str = ""

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("_", "").replace("-", "").isalnum() or self.id != self.id.lower():
            raise ValueError(f"backend id {self.id!r} must be lowercase letters, digits, '-' or '_'")
        if self.device not in DEVICE_CLASSES:
            raise ValueError(f"backend {self.id!r}: device {self.device!r} is not one of {', '.join(DEVICE_CLASSES)}")
        for half in ("compiler", "runtime"):
            ref = getattr(self, half)
            if ref.count(":") != 1:
                raise ValueError(f"backend {self.id!r}: {half} {ref!r} must look like 'package.module:Class'")
        for field in ("options", "runtime_options"):
            object.__setattr__(self, field, {str(k): _as_option(v) for k, v in dict(getattr(self, field)).items()})

    def option_table(self, runtime: bool = False) -> Mapping[str, Option]:
        """The typed compile (or runtime) options."""
        return self.runtime_options if runtime else self.options  # type: ignore[return-value]


def import_ref(ref: str) -> Any:
    """Import ``"package.module:Attr"`` and return the attribute."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass
class Lowered:
    """What :meth:`Compiler.preprocess` returns for one partition.

    :param blob: the delegate payload, opaque to the core, stored as one segment of the program.
    :param metadata: small JSON-serialisable dict (compiler name and version, target, ...);
        handed back to :meth:`Runtime.load`, shown by ``handoff inspect``.
    """

    blob: bytes
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class LoweringError(Exception):
    """Raised by a compiler that knows which node made lowering fail.

    :param message: what went wrong, in the vendor compiler's words.
    :param node: name of the first failing node of the partition's graph, when known.
    """

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


class Compiler:
    """The ahead-of-time half of a backend: subclass it, implement :meth:`support` and
    :meth:`preprocess`, override the other methods where the backend needs them.

    Instantiated once per ``partition`` run (one instance serves its :meth:`support` and every
    :meth:`preprocess`, see there) with the options the user passed for this backend,
    already parsed and checked against :attr:`BackendSpec.options`, defaults filled in
    (``--option xnnpack.threads=2`` -> ``{"threads": 2}``). Raise ``ValueError`` for combinations
    of values that are invalid together, saying which values are valid.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)

    def support(self, ep: Any) -> Mapping[str, str | None]:
        """Capability. ``ep`` is the whole ``torch.export.ExportedProgram`` after decomposition
        (``getitem`` nodes included; ops kept whole for any selected backend stay whole).

        :return: for each ``call_function`` node name of ``ep.graph``: ``None`` when the backend
            can run it, else a one-line reason ("dtype int64 not supported", "add with alpha != 1").
            Nodes missing from the mapping count as declined with reason "not reported".
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement support()")

    def preprocess(self, ep: Any, name: str) -> Lowered:
        """Lower one partition. ``ep`` is an ``ExportedProgram`` holding exactly the partition's
        nodes; its user inputs and outputs are the partition's, in order; its parameters and
        buffers are the weights the partition uses. ``name`` identifies the partition in messages.

        Raise :class:`LoweringError` (with ``node`` when known) or any exception on failure; the core
        adds the backend and partition to the message and may fall back to the next backend.

        Work :meth:`support` did may be reused here: in a ``partition`` run the core calls
        :meth:`support` (unless the capability cache answers) and then ``preprocess`` on the same
        instance, for programs cut from the same, unchanged ``ep``. :func:`handoff.partition_source`
        of ``ep`` names that program and says whether this cut is the whole of it
        (:class:`handoff.PartitionSource`); keep such work on the instance, at most one per
        partition, never process-wide (docs/plugins.md, "Carrying work from support to preprocess").
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement preprocess()")

    def ops_to_not_decompose(self) -> Sequence[Any]:
        """ATen ``OpOverload`` objects this backend wants kept whole during decomposition to
        core ATen (ExecuTorch's ``ops_to_not_decompose``), e.g. ``torch.ops.aten.linear.default``.
        Ops kept for one backend reach the others whole too, so each backend's ``support`` must
        judge them like any other op. Default: none."""
        return ()

    def fused_patterns(self, ep: Any) -> Sequence[Sequence[str]]:
        """Groups of node names that must land in one partition of this backend, or not at all
        (a conv + batch norm + relu the backend fuses). Default: none."""
        return ()

    def check_partition(self, ep: Any, nodes: Sequence[str]) -> Mapping[str, str]:
        """After planning, before lowering: may this backend compile ``nodes`` (a partition the
        planner formed, topological order, ``getitem`` nodes included) as one graph?

        ``ep`` is the whole program, as :meth:`support` saw it. Return the nodes to take out of the
        partition, each with a one-line reason ("QNN HTP fails to compile aten.mm in this graph:
        ..."); the core plans again without them (they go to the next backend) and asks again.
        Cut a candidate group out with :func:`handoff.extract_partition` to test-compile it.
        The core caches the answer (:class:`handoff.cache.CapabilityCache`: per program,
        partition, options, plugin code and :meth:`cache_key`); a backend keeps no cache of its
        own. Default: ``{}`` (every partition of supported nodes compiles)."""
        return {}

    def quantizer(self, scheme: str) -> Any | None:
        """The PT2E quantizer (a ``torchao.quantization.pt2e.quantizer.Quantizer``) that annotates
        a float model for this backend's integer kernels under ``scheme`` (``"int8"``), or ``None``
        when the backend offers none. ``handoff partition --quantize`` composes the selected
        backends' quantizers in priority order, the way ExecuTorch's ``ComposableQuantizer`` does:
        each annotates only what no higher-priority quantizer annotated. The quantizer may read
        this backend's options (``self.options``), e.g. 16-bit activations. Default: ``None``."""
        return None

    def cache_key(self) -> str:
        """Whatever else decides the blob, and the answers of :meth:`support`,
        :meth:`fused_patterns` and :meth:`check_partition`, besides the partition, the options, the
        backend version and the plugin's code (which the core adds itself: its distribution version
        and a digest of its installed files), e.g. the vendor compiler's version or a detected CPU,
        so the lowering and capability caches in ``$HANDOFF_HOME`` never return a blob or an answer
        made under other conditions. Default: ``""``."""
        return ""


class Runtime:
    """The runtime half of a backend: subclass it, implement :meth:`load` and :meth:`execute`.

    Must import without torch or the vendor compiler at module level; import the vendor runtime
    inside the methods. Instantiated once per process, lazily, the first time a loaded program
    needs this backend, and shared by every program and thread of the process.

    **Values.** ``execute`` receives, in the partition's input order, either numpy arrays in host
    memory (C-contiguous, *read-only*: they may view the program file or the caller's input, so
    copy before writing) or, for inputs produced by a delegate whose :meth:`memory` is the same
    domain as this delegate's, the values that delegate returned, untouched. It returns values in
    the delegate's own :meth:`memory` domain: numpy arrays for ``"host"``, or device values (a
    DLPack-capable tensor, a GPU buffer) that the core hands straight to the next delegate of the
    same domain, converting with :meth:`to_host` only for host ops, other domains and the
    program's outputs. Outputs must have the dtype and shape the program declares.

    **Threads.** ``Program.run`` may be called from many threads. Unless :attr:`reentrant` is true,
    the core never runs one handle's ``execute`` twice at once, and holds it until the device
    values that call returned are no longer needed (so an ``execute`` may reuse its output buffers
    on the next call).
    """

    #: ``True`` when ``execute`` may run concurrently on one handle (it keeps no per-call state in
    #: the handle, or locks what it shares itself).
    reentrant: bool = False
    #: ``True`` when the vendor runtime may crash the process (abort, segfault) on a malformed blob
    #: instead of raising. The core then loads, runs and releases every blob not produced on this
    #: machine once in a separate process before :meth:`load` sees it here, and remembers the
    #: blobs that passed (:mod:`handoff.probe`). ``load`` must work in that process too: it gets
    #: the same blob, metadata and options.
    isolate_untrusted: bool = False
    #: ``True`` when a blob is native code (a shared library to ``dlopen``). The core then loads
    #: the program only when it is signed by a key the user trusts (or the user allowed unsigned
    #: programs), and ``load`` must turn the blob into a file with :func:`handoff.native_library`,
    #: which refuses bytes other than the signed ones. See ``docs/security.md``.
    native_code: bool = False
    #: ``True`` when the numpy arrays a host-memory ``execute`` returns are fresh: writable, and
    #: sharing memory with nothing else (not its inputs, the blob, its handle's buffers, nor an
    #: earlier call's outputs), so nothing writes to them after the call. The core then hands them
    #: to the caller of ``Program.run`` as they are, without the copy or the alias check it makes
    #: otherwise. Leave it ``False`` when any output may be a view or a reused buffer.
    fresh_outputs: bool = False

    def is_available(self) -> tuple[bool, str]:
        """Whether this backend can run here, and why not (``(False, "onnxruntime-qnn not
        installed: pip install onnxruntime-qnn==2.7.0")``). Must not raise. Default: available."""
        return True, ""

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
        """Initialise one delegate from its blob (a read-only view into the mapped program file),
        its metadata, and the runtime options (parsed, defaults filled in). Called once per
        delegate at program load. ``metadata`` (part of the manifest) and ``options`` are
        read-only: later loads of the unchanged file share them (docs/plugins.md); copy what you
        change. Returns an opaque handle. The blob is untrusted input: raise
        ``ValueError`` with a clear message when it is corrupt or was made for another runtime
        version, and never let it crash the process."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load()")

    def execute(self, handle: Any, inputs: Sequence[Any]) -> Sequence[Any]:
        """Run the delegate (see the class docstring for what ``inputs`` and the result hold)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement execute()")

    def memory(self, handle: Any) -> str:
        """The memory domain ``execute`` of this handle returns values in: :data:`HOST_MEMORY`
        (numpy arrays; the default) or a name that equals another handle's exactly when values
        can pass between them without a copy (``"tvm:cpu"``, ``"wgpu:NVIDIA H200"``)."""
        return HOST_MEMORY

    def to_host(self, values: Sequence[Any]) -> list[Any]:
        """Numpy arrays of device values this runtime returned (several at once, so a GPU reads
        them back in one transfer). Default: ``numpy.from_dlpack`` (no copy) where the value
        supports DLPack, else ``numpy.asarray``."""
        import numpy as np

        return [np.from_dlpack(v) if hasattr(v, "__dlpack__") else np.asarray(v) for v in values]

    def stats(self, handle: Any) -> Mapping[str, Any]:
        """Measurements of the delegate's last ``execute`` (device time, host phases),
        JSON-serialisable; shown by ``Program.stats()`` and the benchmarks. Default: none."""
        return {}

    def release(self, handle: Any) -> None:
        """Free what ``load`` allocated. Called once per handle, when the program is closed."""
