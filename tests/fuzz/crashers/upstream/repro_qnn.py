"""Reproducer for the QNN HTP backend crash found by fuzzing (docs/upstream/qnn-htp-*.md).

Uses ONNX Runtime and the onnxruntime-qnn plugin EP only (no handoff): create a session from an
EPContext model (``ep.context_embed_mode=0``: the node names its context binary, read from the
model's directory) with the QNN EP on the HTP backend (the x86-64 emulator on Linux). A corrupt
context binary should fail session creation with an ORT error; the input next to this script
kills the process instead (SIGSEGV in ``QnnContext_createFromBinary``).

    python repro_qnn.py DIR/qnn_ctx.onnx      (DIR also holds the context binary it names)
"""

import sys

import onnxruntime as ort
import onnxruntime_qnn as oq

ort.register_execution_provider_library(oq.EP_NAME, oq.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == oq.EP_NAME]
so = ort.SessionOptions()
so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
so.add_session_config_entry("ep.context_file_path", sys.argv[1])
so.add_provider_for_devices(devices, {"backend_path": oq.get_qnn_htp_path()})
print("creating the session", flush=True)
session = ort.InferenceSession(open(sys.argv[1], "rb").read(), so)
print("session created (no crash)", flush=True)
