"""torchvision's models as ``torchvision:NAME``: real architectures nobody here wrote, randomly
initialised (no downloads), with the zoo's calibrated norms (imports torch and torchvision).

torchvision's PyPI wheel is built against CUDA torch: beside the CPU torch its C extension does
not load and ``import torchvision`` fails looking up ``torchvision::nms``. Its models are pure
Python, so :func:`import_torchvision` defines the schemas of the two ops it looks up (no
kernels; no model calls them) before importing it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._weights import calibrated

#: Input of a ``torchvision:`` model unless ``--input-shape`` says otherwise.
DEFAULT_INPUT = ((1, 3, 224, 224), "float32")
#: Constructor arguments some models need to build without downloads or training-only heads.
_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}
_library: Any = None  # the Library defining the schemas; its definitions live as long as it does


def import_torchvision() -> Any:
    """``torchvision``, importable beside the CPU torch (see the module docstring)."""
    global _library
    if _library is None and not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _library = lib
    import torchvision

    return torchvision


def names() -> list[str]:
    """The classification and semantic-segmentation models torchvision offers (``torchvision:NAME``)."""
    models = import_torchvision().models
    return sorted({*models.list_models(module=models), *models.list_models(module=models.segmentation)})


def build(name: str, shape: tuple[int, ...] = DEFAULT_INPUT[0], seed: int = 0) -> nn.Module:
    """torchvision model ``name`` with random weights (the same for the same ``seed``), its norms
    calibrated on random inputs of ``shape`` (:func:`handoff.zoo._weights.calibrated`: with the
    initial batch-norm statistics MobileNetV3's outputs are ~1e-10 and barely depend on the
    input), in eval mode. Segmentation models return their ``"out"`` map alone."""
    models = import_torchvision().models
    known = names()
    if name not in known:
        raise ValueError(f"unknown torchvision model '{name}'; classification and segmentation models: "
                         f"{', '.join(known)}")
    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(seed)
        segmentation = name in models.list_models(module=models.segmentation)
        kwargs = {**_KWARGS.get(name, {}), **({"weights_backbone": None} if segmentation else {})}  # no downloads
        model = models.get_model(name, weights=None, **kwargs)
        if segmentation:
            model = _Out(model)
        return calibrated(model, [(tuple(shape), "float32")], seed + 1)


class _Out(nn.Module):
    """A segmentation model's ``"out"`` map (torchvision's models return a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]
