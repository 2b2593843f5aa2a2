"""The model zoo: what a ``zoo:NAME`` model is, and the built-in ones.

``handoff.zoo`` (this module) imports no torch: it holds :class:`ZooModel` (a plugin's
``handoff_zoo_models`` hook returns them), :class:`ResolvedModel` (what a model source produced),
the input helpers, and :data:`BUILTIN`, the core's own zoo. The models themselves live in one
module per family and are imported only when one is built:

* :mod:`handoff.zoo.cnn`: ``small_cnn``, ``mobilenet_v2``, ``resnet18``, and the MobileNetV3
  image embedding of ``image_to_music``;
* :mod:`handoff.zoo.transformer`: ``small_transformer``, ``vit_tiny``, ``langid``;
* :mod:`handoff.zoo.unet`: ``squeezesam`` (interactive segmentation);
* :mod:`handoff.zoo.rnn`: ``bandwidth_gru``, ``noise_suppressor``.
* :mod:`handoff.zoo.vision`: torchvision's models as ``torchvision:NAME`` (not in :data:`BUILTIN`:
  any classification or segmentation model torchvision has, built on demand).

Every built-in has deterministic random weights whose norms are calibrated (batch norms get the
statistics of random data, so activations keep their scale through deep stacks and outputs
really depend on the input), a docstring stating its parameter count and FLOPs (a test checks
them against :func:`measure`), and exports with ``torch.export``. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from ..program import DTYPES

#: ``((1, 3, 224, 224), "float32")``: one example input's shape and dtype.
InputSpec = tuple[tuple[int, ...], str]

#: What ``--input-shape NxM:DTYPE`` takes: every dtype a program file can hold.
INPUT_DTYPES = tuple(DTYPES)
#: Integer example inputs are drawn from ``[0, DEFAULT_INT_HIGH)`` unless a model says otherwise.
DEFAULT_INT_HIGH = 8


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A model reachable as ``zoo:NAME``.

    :param factory: ``"module:function"`` (or a callable) returning an ``nn.Module`` in eval mode
        with non-degenerate random weights.
    :param inputs: shape and dtype of each example input.
    :param description: one line for ``handoff zoo``.
    :param params: parameter count (trainable parameters; buffers such as a lookup table are not
        counted), shown by ``handoff zoo``; ``None`` when not stated.
    :param flops: floating-point operations of one inference on :attr:`inputs`, as
        ``torch.utils.flop_counter`` counts them (2 per multiply-accumulate of matrix products and
        convolutions; elementwise ops are not counted); ``None`` when not stated.
    :param int_high: integer inputs are drawn from ``[0, int_high)`` (a vocabulary size: 256 for
        bytes).
    """

    factory: str | Callable[[], Any]
    inputs: Sequence[InputSpec]
    description: str = ""
    params: int | None = None
    flops: int | None = None
    int_high: int = DEFAULT_INT_HIGH

    def build(self) -> Any:
        """A fresh instance of the model (the same weights every time)."""
        if callable(self.factory):
            return self.factory()
        from ..backend import import_ref

        return import_ref(self.factory)()

    def example_inputs(self, seed: int = 0) -> tuple[Any, ...]:
        """Random tensors of :attr:`inputs`, the same for the same seed (imports torch)."""
        return random_inputs(self.inputs, seed=seed, int_high=self.int_high)


@dataclasses.dataclass
class ResolvedModel:
    """What a model source produced: either an ``nn.Module`` with example inputs, or an already
    exported program (a ``.pt2`` file).

    :param zoo: the :class:`ZooModel` it came from, when it is a ``zoo:`` model (its
        :meth:`~ZooModel.example_inputs` draws fresh inputs of the right range).
    """

    name: str
    module: Any = None
    example_inputs: tuple[Any, ...] = ()
    exported: Any = None
    zoo: ZooModel | None = None


def parse_input_shape(text: str) -> InputSpec:
    """``"1x3x224x224"`` or ``"1x128:int64"`` -> ``((1, 3, 224, 224), "float32")``; ``ValueError``
    with a one-line message for anything else, including a shape whose example tensor would exceed
    :data:`handoff.limits.MAX_EXAMPLE_INPUT_BYTES`."""
    shape_text, _, dtype = text.partition(":")
    dtype = dtype or "float32"
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x")) if shape_text else ()
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: expected dimensions like 1x3x224x224[:dtype]") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"--input-shape {text!r}: dimensions must be >= 0")
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"--input-shape {text!r}: dtype {dtype!r} not one of {', '.join(INPUT_DTYPES)}")
    import numpy as np

    from ..limits import check_example_input

    check_example_input(text, shape, np.dtype(dtype).itemsize)
    return shape, dtype


def random_inputs(specs: Sequence[InputSpec], seed: int = 0, int_high: int = DEFAULT_INT_HIGH) -> tuple[Any, ...]:
    """Example tensors for ``specs``: normal floats, integers in ``[0, int_high)``, random bools."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in specs:
        tdt = getattr(torch, dtype)
        if tdt.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(tdt))
        elif tdt == torch.bool:
            out.append(torch.rand(shape, generator=gen) > 0.5)
        else:
            out.append(torch.randint(0, int_high, shape, generator=gen).to(tdt))
    return tuple(out)


def measure(module: Any, inputs: Sequence[Any]) -> tuple[int, int]:
    """``(parameters, FLOPs)`` of ``module`` on ``inputs``: the trainable parameter count and the
    floating-point operations ``torch.utils.flop_counter.FlopCounterMode`` counts for one call
    (2 per multiply-accumulate of matrix products and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(params), int(counter.get_total_flops())


def _zoo(factory: str, inputs: Sequence[InputSpec], description: str, params: int, flops: int,
         int_high: int = DEFAULT_INT_HIGH) -> ZooModel:
    return ZooModel(f"handoff.zoo.{factory}", inputs, description, params, flops, int_high)


#: The core's zoo (the built-in model-sources plugin, :mod:`handoff.sources`, offers it). The
#: figures are the factories' docstrings'; ``tests/test_zoo.py`` recomputes both.
BUILTIN: dict[str, ZooModel] = {
    "small_cnn": _zoo("cnn:small_cnn", [((1, 3, 64, 64), "float32")],
                      "conv-bn-relu CNN with a residual block -> 10 classes", 10218, 43647616),
    "small_transformer": _zoo("transformer:small_transformer", [((1, 32, 64), "float32")],
                              "2-layer pre-norm transformer encoder, 32 tokens x 64 dims", 70160, 4720640),
    "mobilenet_v2": _zoo("cnn:mobilenet_v2", [((1, 3, 224, 224), "float32")],
                         "MobileNetV2 1.0 -> 1000 classes", 3504872, 601548544),
    "resnet18": _zoo("cnn:resnet18", [((1, 3, 224, 224), "float32")], "ResNet-18 -> 1000 classes",
                     11689512, 3628146688),
    "vit_tiny": _zoo("transformer:vit_tiny", [((1, 3, 224, 224), "float32")],
                     "ViT-Tiny/16: 12 layers x 192 dims, 3 heads -> 1000 classes", 5717416, 2507366400),
    "squeezesam": _zoo("unet:squeezesam", [((1, 3, 128, 128), "float32"), ((1, 2, 128, 128), "float32")],
                       "SqueezeSAM-style interactive segmentation: UNet over RGB + positive/negative click "
                       "maps, attention bottleneck -> mask logits", 753249, 1546649600),
    "bandwidth_gru": _zoo("rnn:bandwidth_gru", [((1, 32, 8), "float32")],
                          "network bandwidth estimator: GRU over 32 packets x 8 statistics -> bits/s",
                          21281, 1200192),
    "langid": _zoo("transformer:langid", [((1, 128), "int64")],
                   "language identifier: 128 bytes -> byte embeddings, 2-layer transformer -> 200 languages",
                   206024, 50370048, int_high=256),
    "image_to_music": _zoo("cnn:image_to_music", [((1, 3, 224, 224), "float32")],
                           "image-to-music suggestion: MobileNetV3-Small embedding, cosine similarity with "
                           "2048 track embeddings -> top-10 scores and track ids", 1649056, 111759232),
    "noise_suppressor": _zoo("rnn:noise_suppressor", [((1, 32, 129), "float32")],
                             "call-audio noise suppressor: 32 frames x 129 bins, spectrogram convs + GRU -> "
                             "masked spectrum", 255857, 26330112),
}
