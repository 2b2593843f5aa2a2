"""The core's built-in plugin for model sources: what the MODEL argument can name.

Registered like any plugin (``trylast``), so another plugin can add sources or override these.
Sources: ``zoo:NAME`` (the built-in models of :mod:`handoff.zoo` and every plugin's);
``torchvision:NAME`` (torchvision's classification and segmentation models, random weights,
1x3x224x224 unless ``--input-shape``: :mod:`handoff.zoo.vision`); ``path.pt2``
written by ``torch.export.save``; ``path/file.py:Name`` where ``Name`` is an ``nn.Module``
subclass or a factory, with inputs from ``--input-shape`` or from an ``example_inputs()``
function in that file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .hookspecs import hookimpl
from .hostops import NAMESPACES
from .zoo import BUILTIN, InputSpec, ResolvedModel, ZooModel, random_inputs

TORCHVISION = "torchvision:"


@hookimpl(trylast=True)
def handoff_zoo_models() -> dict[str, ZooModel]:
    return dict(BUILTIN)


@hookimpl(trylast=True)
def handoff_resolve_model(spec: str, input_shapes: Sequence[InputSpec],
                          zoo: Mapping[str, ZooModel], trust_model: bool) -> ResolvedModel | None:
    if spec.startswith("zoo:"):
        return _from_zoo(spec[4:], input_shapes, zoo)
    if spec.startswith(TORCHVISION):
        return _from_torchvision(spec.removeprefix(TORCHVISION), input_shapes)
    path_part, sep, name = spec.rpartition(":") if spec.count(":") else ("", "", "")
    if sep and path_part.endswith(".py"):
        return _from_python_file(Path(path_part), name, input_shapes)
    if spec.endswith(".pt2"):
        return _from_pt2(Path(spec), trust_model)
    return None


def _from_zoo(name: str, input_shapes: Sequence[InputSpec], zoo: Mapping[str, ZooModel]) -> ResolvedModel:
    if name not in zoo:
        raise ValueError(f"unknown zoo model '{name}'; zoo models: {', '.join(sorted(zoo))}")
    model = zoo[name]
    inputs = random_inputs(input_shapes, int_high=model.int_high) if input_shapes else model.example_inputs()
    return ResolvedModel(name=f"zoo:{name}", module=model.build(), example_inputs=inputs, zoo=model)


def _from_torchvision(name: str, input_shapes: Sequence[InputSpec]) -> ResolvedModel:
    from .zoo import vision

    (shape, dtype), *more = input_shapes or [vision.DEFAULT_INPUT]
    if more or dtype != "float32":
        raise ValueError(f"torchvision:{name} takes one float32 image batch; give one --input-shape like 1x3x224x224")
    try:
        module = vision.build(name, shape)
    except ImportError as exc:
        raise ValueError(f"torchvision:{name}: torchvision is not installed ({exc}); pip install torchvision") from None
    return ResolvedModel(name=f"{TORCHVISION}{name}", module=module, example_inputs=random_inputs([(shape, dtype)]))


def _from_pt2(path: Path, trust_model: bool) -> ResolvedModel:
    """A ``torch.export.save`` file. It can hold pickles, which run code when loaded (torch's own
    loader falls back to ``torch.load(weights_only=False)``), so unless ``trust_model`` it must hold
    none: its archive is checked first, and every ``torch.load`` it makes is forced to torch's
    restricted ``weights_only`` unpickler."""
    import torch

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch.export.save file (not a zip archive); write it with torch.export.save")
    if not trust_model:
        why = _pickle_payload(path)
        if why:
            raise ValueError(f"{path}: {why}, which runs code when loaded; a .pt2 file is code you run (like a .py): "
                             f"pass --trust-model if you trust its author")
    register_op_namespaces()
    logging.disable(logging.ERROR)  # torch logs its own traceback before raising; we say it in one line
    try:
        with contextlib.nullcontext() if trust_model else _weights_only(path):
            ep = torch.export.load(str(path))
    except _PickleRefused as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:
        raise ValueError(f"{path}: not a torch.export.save file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    finally:
        logging.disable(logging.NOTSET)
    args = ep.example_inputs[0] if ep.example_inputs else ()
    return ResolvedModel(name=path.name, exported=ep, example_inputs=tuple(args))


class _PickleRefused(Exception):
    pass


def _pickle_payload(path: Path) -> str | None:
    """What in a ``.pt2`` archive is a pickle beyond torch's restricted tensor unpickler, if any."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(n.endswith("/archive_format") or n == "archive_format" for n in names):
                return "it is a legacy torch.export archive, whose weights are pickles"
            for name in names:
                if "/data/aotinductor/" in f"/{name}" or "/data/executorch/" in f"/{name}":
                    return f"it holds compiled artifacts ({name})"
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for fqn, meta in config.items():
                        if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(("custom_obj_",
                                                                                                 "opaque_obj_")):
                            return f"it holds a pickled object ({fqn})"
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError) as exc:
        return f"its archive cannot be checked ({type(exc).__name__})"
    return None


@contextlib.contextmanager
def _weights_only(path: Path) -> Any:
    """Make every ``torch.load`` inside use the restricted unpickler, and refuse the fallback to
    ``weights_only=False`` that ``torch.export.load`` attempts for example inputs."""
    import torch

    real = torch.load

    def guarded(f: Any, *args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        if weights_only is False:
            raise _PickleRefused(f"{path}: its example inputs are a pickle beyond torch's restricted unpickler, which "
                                 f"runs code when loaded; a .pt2 file is code you run (like a .py): pass --trust-model "
                                 f"if you trust its author")
        return real(f, *args, weights_only=True, **kwargs)

    with _TORCH_LOAD_LOCK:
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = real


_TORCH_LOAD_LOCK = threading.Lock()


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
