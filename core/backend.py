"""The backend contract: what a plugin hands the core for each backend it provides.

A plugin's ``handoff_backends`` hook returns :class:`BackendSpec` objects. A spec is cheap: it
names the backend and points, by import path, at its two halves:

* the **compiler** (ahead of time; may import torch and the vendor compiler) — a class with the
  methods of :class:`Compiler`: capability (``support``) and lowering (``preprocess``);
* the **runtime** (on the device; must import without torch or the vendor compiler) — a class
  with the methods of :class:`Runtime`: ``is_available``, ``load``, ``execute``, ``release``.

Neither half is imported until it is needed, so ``import handoff.runtime`` and ``handoff backends``
stay fast, and a program needing only XNNPACK never imports TVM.

Vocabulary follows ExecuTorch: a *partition* is a connected, acyclic set of graph nodes claimed by
one backend; *preprocess* lowers it to a *delegate blob*; the *compile spec* is the options dict.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping, Protocol, Sequence

#: Device classes a backend may declare (``registry.yaml`` uses the same words).
DEVICE_CLASSES = ("cpu", "gpu", "npu")


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One backend, as a plugin declares it.

    :param id: stable, lowercase identifier used on the command line and in program files.
    :param version: the plugin's version; written into every delegate it produces.
    :param compiler: ``"module:Class"`` of the ahead-of-time half (see :class:`Compiler`).
    :param runtime: ``"module:Class"`` of the runtime half (see :class:`Runtime`).
    :param device: one of :data:`DEVICE_CLASSES`.
    :param description: one line for ``handoff backends``.
    :param options: every compile option the backend accepts (``handoff partition --option
        ID.NAME=VALUE``), name -> one line of help. The core refuses any other name, listing these.
    :param runtime_options: likewise for run time (``handoff run --option``, ``handoff.load(...,
        options=)``), e.g. a thread count.
    """

    id: str
    version: str
    compiler: str
    runtime: str
    device: str = "cpu"
    description: str = ""
    options: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    runtime_options: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("_", "").replace("-", "").isalnum() or self.id != self.id.lower():
            raise ValueError(f"backend id {self.id!r} must be lowercase letters, digits, '-' or '_'")
        if self.device not in DEVICE_CLASSES:
            raise ValueError(f"backend {self.id!r}: device {self.device!r} is not one of {', '.join(DEVICE_CLASSES)}")
        for half in ("compiler", "runtime"):
            ref = getattr(self, half)
            if ref.count(":") != 1:
                raise ValueError(f"backend {self.id!r}: {half} {ref!r} must look like 'package.module:Class'")


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


class Compiler(Protocol):
    """The ahead-of-time half of a backend. Instantiated once per ``partition`` run with the
    options the user passed for this backend (``--option xnnpack.threads=2`` -> ``{"threads": "2"}``),
    already checked against :attr:`BackendSpec.options`; a bad value raises ``ValueError`` saying
    which values are valid.
    """

    def __init__(self, options: Mapping[str, str]) -> None: ...

    def ops_to_not_decompose(self) -> Sequence[Any]:
        """ATen ``OpOverload`` objects this backend wants kept whole during decomposition to
        core ATen (ExecuTorch's ``ops_to_not_decompose``), e.g. ``torch.ops.aten.linear.default``.
        Ops kept for one backend reach the others whole too, so each backend's ``support`` must
        judge them like any other op."""
        ...

    def support(self, ep: Any) -> Mapping[str, str | None]:
        """Capability. ``ep`` is the whole ``torch.export.ExportedProgram`` after decomposition.

        :return: for each ``call_function`` node name of ``ep.graph``: ``None`` when the backend
            can run it, else a one-line reason ("dtype int64 not supported", "add with alpha != 1").
            Nodes missing from the mapping count as declined with reason "not reported".
        """
        ...

    def fused_patterns(self, ep: Any) -> Sequence[Sequence[str]]:
        """Optional groups of node names that must land in one partition of this backend, or not
        at all (a conv + batch norm + relu the backend fuses). Return ``[]`` when there are none."""
        ...

    def cache_key(self) -> str:
        """Optional. Whatever else decides the blob besides the partition, the options and the
        backend version (the vendor compiler's version, a detected CPU), so the lowering cache
        in ``$HANDOFF_HOME`` never returns a blob built under other conditions."""
        ...

    def preprocess(self, ep: Any, name: str) -> Lowered:
        """Lower one partition. ``ep`` is an ``ExportedProgram`` holding exactly the partition's
        nodes; its user inputs and outputs are the partition's, in order; its parameters and
        buffers are the weights the partition uses. ``name`` identifies the partition in messages.

        Raise :class:`LoweringError` (with ``node`` when known) or any exception on failure; the core
        adds the backend and partition to the message and may fall back to the next backend.
        """
        ...


class Runtime(Protocol):
    """The runtime half of a backend. Must import without torch or the vendor compiler at module
    level; import the vendor runtime inside the methods. Instantiated once per process, lazily,
    the first time a loaded program needs this backend.
    """

    def is_available(self) -> tuple[bool, str]:
        """Whether this backend can run here, and why not (``(False, "onnxruntime-qnn not
        installed: pip install onnxruntime-qnn==2.7.0")``). Must not raise."""
        ...

    def load(self, blob: memoryview, metadata: Mapping[str, Any], options: Mapping[str, str]) -> Any:
        """Initialise one delegate from its blob (a read-only view into the mapped program file)
        and metadata. Called once per delegate at program load. Returns an opaque handle. Raise
        ``ValueError`` with a clear message when the blob was made for another runtime version."""
        ...

    def execute(self, handle: Any, inputs: Sequence[Any]) -> Sequence[Any]:
        """Run the delegate on numpy arrays (in the partition's input order) and return numpy
        arrays (in its output order)."""
        ...

    def stats(self, handle: Any) -> Mapping[str, Any]:
        """Optional. Measurements of the delegate's last ``execute`` (device time, host phases),
        JSON-serialisable; shown by ``Program.stats()`` and the benchmarks."""
        ...

    def release(self, handle: Any) -> None:
        """Free what ``load`` allocated. Called once per handle, when the program is closed."""
        ...
