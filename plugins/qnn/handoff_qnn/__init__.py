"""handoff-qnn: Qualcomm QNN HTP context binaries through ONNX Runtime's QNN execution provider.

* :mod:`handoff_qnn.plugin` declares the ``qnn`` backend (imports neither torch nor onnxruntime);
* :mod:`handoff_qnn.compiler` exports a partition to ONNX and compiles it with the QNN EP into a
  QNN context binary plus the EPContext model that names it;
* :mod:`handoff_qnn.runtime` loads those two into an ONNX Runtime session (no torch, no recompile);
* :mod:`handoff_qnn.ops` is the per-op capability table, checked against real compiles by
  ``tools/check_op_table.py``;
* :mod:`handoff_qnn._format` is the delegate blob container and the options both halves share.
"""

__version__ = "0.1.0"

#: The onnxruntime-qnn release this plugin is built and tested against (it bundles QNN SDK 2.51).
ONNXRUNTIME_QNN_VERSION = "2.7.0"
INSTALL_HINT = f"pip install onnxruntime-qnn=={ONNXRUNTIME_QNN_VERSION}"
