"""XNNPACK CPU kernels for handoff, through ExecuTorch's XNNPACK delegate.

Importing this package is cheap: it imports neither torch nor executorch. The compiler half
(:mod:`handoff_xnnpack.compiler`) imports both; the runtime half (:mod:`handoff_xnnpack.runtime`)
imports ExecuTorch's runtime binding only when a delegate is loaded.
"""

__version__ = "0.1.0"

#: The ExecuTorch release this plugin lowers with and is tested against.
EXECUTORCH_VERSION = "1.5.1"

__all__ = ["EXECUTORCH_VERSION", "__version__"]
