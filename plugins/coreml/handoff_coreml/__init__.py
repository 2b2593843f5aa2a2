"""handoff-coreml: Apple Core ML ML Programs converted by coremltools, run by Core ML.

* :mod:`handoff_coreml.plugin` declares the ``coreml`` backend (imports neither torch nor coremltools);
* :mod:`handoff_coreml.capability` says which nodes Core ML takes, by asking coremltools' own torch
  frontend to translate each node (checked against real conversions by ``tools/check_op_table.py``);
* :mod:`handoff_coreml.compiler` converts a partition to an ML Program (``.mlpackage``) and checks
  what it produced;
* :mod:`handoff_coreml.runtime` runs the package with Core ML through coremltools (macOS only);
* :mod:`handoff_coreml.reference` evaluates a package on any host with the numpy semantics of
  coremltools' MIL ops (where every op has them), for tests and the op-table check;
* :mod:`handoff_coreml._format` is the delegate blob (the package as one zip archive in
  handoff's envelope) and the options both halves share.
"""

__version__ = "0.1.0"

#: The coremltools release this plugin converts with and is tested against.
COREMLTOOLS_VERSION = "9.0"
INSTALL_HINT = f"pip install coremltools=={COREMLTOOLS_VERSION}"
#: Why the runtime half is unavailable anywhere but on Apple platforms.
NOT_APPLE = "Core ML executes only on Apple platforms (macOS/iOS)"
