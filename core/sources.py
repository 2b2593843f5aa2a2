"""The core's built-in plugin for model sources: what the MODEL argument can name.

Registered like any plugin (``trylast``), so another plugin can add sources or override these.
Sources: ``zoo:NAME`` (the built-in models of :mod:`handoff.zoo` and every plugin's); ``path.pt2``
written by ``torch.export.save``; ``path/file.py:Name`` where ``Name`` is an ``nn.Module``
subclass or a factory, with inputs from ``--input-shape`` or from an ``example_inputs()``
function in that file.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from .hookspecs import hookimpl
from .hostops import NAMESPACES
from .zoo import BUILTIN, InputSpec, ResolvedModel, ZooModel, random_inputs


@hookimpl(trylast=True)
def handoff_zoo_models() -> dict[str, ZooModel]:
    return dict(BUILTIN)


@hookimpl(trylast=True)
def handoff_resolve_model(spec: str, input_shapes: Sequence[InputSpec],
                          zoo: Mapping[str, ZooModel]) -> ResolvedModel | None:
    if spec.startswith("zoo:"):
        return _from_zoo(spec[4:], input_shapes, zoo)
    path_part, sep, name = spec.rpartition(":") if spec.count(":") else ("", "", "")
    if sep and path_part.endswith(".py"):
        return _from_python_file(Path(path_part), name, input_shapes)
    if spec.endswith(".pt2"):
        return _from_pt2(Path(spec))
    return None


def _from_zoo(name: str, input_shapes: Sequence[InputSpec], zoo: Mapping[str, ZooModel]) -> ResolvedModel:
    if name not in zoo:
        raise ValueError(f"unknown zoo model '{name}'; zoo models: {', '.join(sorted(zoo))}")
    model = zoo[name]
    inputs = random_inputs(input_shapes, int_high=model.int_high) if input_shapes else model.example_inputs()
    return ResolvedModel(name=f"zoo:{name}", module=model.build(), example_inputs=inputs, zoo=model)


def _from_pt2(path: Path) -> ResolvedModel:
    import torch

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch.export.save file (not a zip archive); write it with torch.export.save")
    register_op_namespaces()
    logging.disable(logging.ERROR)  # torch logs its own traceback before raising; we say it in one line
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a torch.export.save file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    finally:
        logging.disable(logging.NOTSET)
    args = ep.example_inputs[0] if ep.example_inputs else ()
    return ResolvedModel(name=path.name, exported=ep, example_inputs=tuple(args))


def register_op_namespaces() -> None:
    """Import what registers the non-ATen ops a program may hold (:data:`handoff.hostops.NAMESPACES`):
    a ``.pt2`` of a PT2E-quantized model holds ``quantized_decomposed`` ops, which torch registers
    only when asked, so loading one would otherwise fail whichever backends are installed."""
    for module in NAMESPACES.values():
        if module:
            importlib.import_module(module)


def _from_python_file(path: Path, name: str, input_shapes: Sequence[InputSpec]) -> ResolvedModel:
    import torch

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    module_name = f"handoff_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ValueError(f"{path}: importing it failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    if not hasattr(module, name):
        found = [k for k, v in vars(module).items()
                 if (inspect.isclass(v) and issubclass(v, torch.nn.Module) and v.__module__ == module_name)]
        raise ValueError(f"{path}: has no '{name}'; nn.Module classes there: {', '.join(found) or 'none'}")
    target = getattr(module, name)
    try:
        model = target()
    except Exception as exc:
        raise ValueError(f"{path}:{name}: calling it with no arguments failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{path}:{name} returned {type(model).__name__}, not an nn.Module")
    if input_shapes:
        inputs = random_inputs(input_shapes)
    elif hasattr(module, "example_inputs"):
        inputs = tuple(module.example_inputs())
    else:
        raise ValueError(f"{path}:{name}: no inputs known; pass --input-shape 1x3x224x224 "
                         f"(once per input) or define example_inputs() in {path.name}")
    return ResolvedModel(name=f"{path.name}:{name}", module=model.eval(), example_inputs=inputs)
