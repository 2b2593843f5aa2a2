"""Step 1 of the pipeline: MODEL argument -> ``torch.export`` -> core ATen.

Decomposition to core ATen keeps whole every op that a selected backend asks for through
``Compiler.ops_to_not_decompose`` (ExecuTorch's mechanism), so XNNPACK still sees ``linear``.
What the model computes from its weights alone is then folded into constants (step 2,
:mod:`handoff.fold`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, Sequence

from .errors import HandoffError
from .fold import fold_constants
from .plugins import Plugins
from .zoo import InputSpec, ResolvedModel


def resolve_model(spec: str, input_shapes: Sequence[InputSpec], plugins: Plugins,
                  trust_model: bool = False) -> ResolvedModel:
    """Ask the ``handoff_resolve_model`` hook what ``spec`` names."""
    try:
        resolved = plugins.pm.hook.handoff_resolve_model(spec=spec, input_shapes=list(input_shapes),
                                                         zoo=plugins.zoo(), trust_model=trust_model)
    except ValueError as exc:
        raise HandoffError(str(exc)) from exc
    if resolved is None:
        raise HandoffError(f"cannot read model {spec!r}; give a .pt2 file (torch.export.save), "
                           f"path/file.py:ClassName, torchvision:NAME, or zoo:NAME (zoo: {', '.join(sorted(plugins.zoo()))})")
    return resolved


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch.export's deprecation noise about its own internals (not the user's code)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
        yield


def torch_export(resolved: ResolvedModel) -> Any:
    """The model's ``ExportedProgram`` before decomposition: ``resolved.exported``, or
    ``torch.export`` of its module on its example inputs."""
    import torch

    if resolved.exported is not None:
        return resolved.exported
    try:
        with torch.no_grad(), quiet_torch():
            return torch.export.export(resolved.module.eval(), tuple(resolved.example_inputs), strict=False)
    except Exception as exc:
        first = " ".join(str(exc).split())[:400]
        raise HandoffError(f"torch.export failed for {resolved.name}: {type(exc).__name__}: {first}; hint: "
                           f"the model must be traceable without data-dependent Python control flow "
                           f"(see torch.export docs on torch.cond), and its inputs must match --input-shape") from exc


class Decompositions:
    """Decomposed programs remembered for one process, by the program decomposed and the ops kept
    whole: :func:`handoff.partition` calls on the same export whose backends keep the same ops
    (``handoff compare``'s strategies: ``xnnpack`` and ``xnnpack,vulkan``; ``tvm`` and ``vulkan``)
    decompose it once. A quantized model is another program, so it gets its own entry, and so is
    a decomposition left unfolded (``fold=False``).

    Held in memory only: an ``ExportedProgram`` on disk is read back with pickle
    (``torch.export.load``), which a cache must not do. Callers must not change a program they
    get from here (the pipeline only reads it; :func:`handoff.quantization.duplicate_dequantize`,
    which edits it in place, is idempotent).
    """

    def __init__(self) -> None:
        # id(exported) -> (exported, {kept ops and fold -> decomposed}); holding ``exported`` keeps its id unique.
        self._programs: dict[int, tuple[Any, dict[frozenset[str], Any]]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, exported: Any, keep_ops: Iterable[Any], decompose: Any, fold: bool = True) -> Any:
        """The decomposition of ``exported`` keeping ``keep_ops`` (folded or not), else
        ``decompose()``, remembered."""
        _, by_keep = self._programs.setdefault(id(exported), (exported, {}))
        key = frozenset([*(str(op) for op in keep_ops), f"fold={fold}"])
        if key in by_keep:
            self.hits += 1
        else:
            self.misses += 1
            by_keep[key] = decompose()
        return by_keep[key]


def export_model(resolved: ResolvedModel, keep_ops: Iterable[Any] = (),
                 shared: Decompositions | None = None, fold: bool = True) -> Any:
    """``torch.export`` the model (unless it already is exported), decompose it to core ATen,
    keeping ``keep_ops`` whole, and (unless ``fold=False``) fold what it computes from its weights
    alone (:func:`handoff.fold.fold_constants`). Returns the ``ExportedProgram``; with ``shared``,
    one remembered there when the same export was decomposed keeping the same ops."""
    ep = torch_export(resolved)
    keep_ops = list(keep_ops)

    def decompose() -> Any:
        decomposed = _decompose(ep, keep_ops, resolved.name)
        return fold_constants(decomposed) if fold else decomposed

    if shared is not None:
        return shared.get(ep, keep_ops, decompose, fold)
    return decompose()


def _decompose(ep: Any, keep_ops: Sequence[Any], name: str) -> Any:
    import torch

    table = torch.export.default_decompositions()
    for op in keep_ops:
        table.pop(op, None)
    try:
        with quiet_torch():
            ep = ep.run_decompositions(table)
    except Exception as exc:
        raise HandoffError(f"decomposing {name} to core ATen failed: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:400]}") from exc
    _drop_metadata_asserts(ep)
    _check_supported_program(ep, name)
    return ep


def _drop_metadata_asserts(ep: Any) -> None:
    """Remove ``aten._assert_tensor_metadata`` nodes (``x.to(dtype)`` on an input exports one).

    They compute nothing and have no users, so the planner would give each a partition of its own
    that no backend can build (TVM: "produced no Relax outputs"); the runtime checks every input's
    dtype and shape against the manifest instead. ExecuTorch's ``to_edge`` drops them likewise."""
    import torch

    graph = ep.graph_module.graph
    asserts = [n for n in graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default]
    for node in asserts:
        graph.erase_node(node)
    if asserts:
        ep.graph_module.recompile()


def _check_supported_program(ep: Any, name: str) -> None:
    sig = ep.graph_signature
    if sig.buffers_to_mutate or getattr(sig, "user_inputs_to_mutate", None):
        what = ", ".join(list(sig.buffers_to_mutate.values()) + list(getattr(sig, "user_inputs_to_mutate", {}).values()))
        raise HandoffError(f"{name} mutates state ({what}); handoff programs are pure functions: "
                           f"call model.eval() and remove in-place updates of buffers and inputs")
    import torch

    for node in ep.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else [val]:
            if isinstance(v, torch.Tensor) and any(not isinstance(d, int) for d in v.shape):
                raise HandoffError(f"{name}: node {node.name} has a dynamic shape {tuple(v.shape)}; "
                                   f"program format 1 needs static shapes: export without dynamic_shapes")
