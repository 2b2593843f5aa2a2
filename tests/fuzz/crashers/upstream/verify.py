"""Check that the upstream reports' reproducers (docs/upstream/) still reproduce.

For each case below: the vendor-only input is extracted from the handoff delegate blob that the
fuzzer saved (``tests/fuzz/crashers/BACKEND/``) into this directory (the ``.pte`` of an xnnpack
blob; the EPContext model and context binary of a qnn blob), then the vendor-only reproducer runs
on it in a child process, one after another. A case reproduces when the child dies of the
expected signal with the expected words on its stderr. Prints one line per case; exit status 1
when one no longer reproduces (fixed upstream? then update the report and the pins).

    python tests/fuzz/crashers/upstream/verify.py [--timeout 600] [--show]
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRASHERS = HERE.parent

_NOISE = re.compile(r"^Failed to load|^W\d{4} |torchao|_pytree|cpuinfo_utils|threadpool.cpp|# LIBNATIVE")
#: name -> (backend, saved blob, expected signal, words the child's stderr must hold)
CASES = {
    "executorch-xnncompiler-invalid-utf8": ("xnnpack", "crash-6d065341a45bfc9708c6e567f7e5b535ef1e88ff",
                                            signal.SIGABRT, "UnicodeDecodeError"),
    "executorch-program-426-checkok": ("xnnpack", "crash-1872d31a8c1d41cf02519580b261e97f76fdb825",
                                       signal.SIGABRT, "program.cpp:426"),
    "executorch-xnnpack-load-method-segfault": ("xnnpack", "crash-add5757992928b6c39c6f5bd82449e233d0f308a",
                                                signal.SIGSEGV, ""),
    "qnn-htp-context-binary-segfault": ("qnn", "crash-d14458f27c4864f66c4cb1b0cbb65fd28a93520e",
                                        signal.SIGSEGV, ""),
}


def extract(name: str, backend: str, blob: str) -> Path:
    """Write the case's vendor-only input next to this script; returns the reproducer's argument."""
    data = (CRASHERS / backend / blob).read_bytes()
    if backend == "xnnpack":
        from handoff_xnnpack import _format

        _, pte = _format.unpack(data)
        out = HERE / f"{name}.pte"
        out.write_bytes(bytes(pte))
        return out
    from handoff_qnn import _format

    container = _format.unpack(data)
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    for section, payload in container.context_binaries:
        (folder / section).write_bytes(bytes(payload))
    model_name, model = container.epcontext_model
    (folder / model_name).write_bytes(bytes(model))
    return folder / model_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--show", action="store_true", help="print each child's last lines")
    args = parser.parse_args()
    failed = 0
    for name, (backend, blob, sig, words) in CASES.items():
        target = extract(name, backend, blob)
        script = HERE / f"repro_{'executorch' if backend == 'xnnpack' else 'qnn'}.py"
        proc = subprocess.run([sys.executable, str(script), str(target)], capture_output=True, text=True,
                              timeout=args.timeout, errors="replace")
        died = -proc.returncode if proc.returncode < 0 else None
        ok = died == sig and words in proc.stderr
        failed += not ok
        how = signal.Signals(died).name if died else f"exit {proc.returncode}"
        print(f"{name}: {'reproduces' if ok else 'DOES NOT REPRODUCE'} ({how}; "
              f"expected {sig.name}{', ' + repr(words) if words else ''})", flush=True)
        if args.show or not ok:  # the child's last words, without the libraries' start-up chatter
            said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and not _NOISE.search(line)]
            print("    " + "\n    ".join(said[-6:]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
