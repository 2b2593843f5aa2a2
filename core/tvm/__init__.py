"""The built-in Apache TVM backend (``tvm``): lowers any partition of core ATen ops that TVM's Relax
importer can convert into a shared library holding a Relax VM executable.

* :mod:`handoff.tvm.plugin` declares the backend (imports neither torch nor TVM);
* :mod:`handoff.tvm.compiler` imports, optionally tunes (MetaSchedule) and builds;
* :mod:`handoff.tvm.runtime` loads the library into a Relax VM and runs it (no torch needed).
"""
