"""An aarch64 Python with torch, TVM and handoff's dependencies, run under qemu-user: how the
benchmarks measure programs cross-compiled for ``--option tvm.target=aarch64`` (and eager torch for
aarch64 beside them) on a machine with no Arm CPU.

``prepare(root)`` fills ``root`` once (about 1.3 GB; a later call finds it ready):

- ``root/sysroot``: Debian's arm64 CPython (``python3.11-minimal``, ``libpython3.11-stdlib``) and
  the C libraries it and the wheels load, from the host's own Debian sources, fetched with
  ``apt-get download`` under a private apt state (the host's apt lists and dpkg database are not
  touched) and unpacked with ``dpkg -x``;
- ``root/site``: manylinux aarch64 wheels for CPython 3.11 (``pip install --target --platform``):
  apache-tvm and apache-tvm-ffi at the host's versions, numpy, handoff's runtime dependencies, and
  :data:`TORCH`, the newest torch whose aarch64 wheel on PyPI is CPU-only (later ones require
  CUDA 13 wheels for aarch64; pip cannot select dependencies by the target's machine, so torch
  comes with ``--no-deps`` and its pure-Python dependencies are listed here).

``python(root, argv, env)`` runs the aarch64 interpreter under ``qemu-aarch64`` with handoff (this
worktree's ``core/``, through a ``handoff`` link in ``root``) and the wheels on its path, emulating
:data:`CPU` unless ``$QEMU_CPU`` names another. Not qemu's default, ``max``: under it the small
transformer ran 5x (eager) and 19x (TVM) slower than under ``neoverse-n1`` and its tvm/eager ratio
went from 0.31 to 1.21 (likely causes, not verified: ``max`` has pointer authentication, which
code built with ``-mbranch-protection`` runs on every call and qemu computes in software, and SVE,
for which torch picks other kernels). A real core of the kind emulated is what settles the ratio.

Emulated times are indicative only: qemu translates each Arm instruction into host code, so a
ratio between two programs measured this way says which one executes fewer (and cheaper to
emulate) instructions, not what an Arm core would show; NEON is emulated without the host's
vector units doing the same work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

#: The Arm core emulated: a Neoverse N1 (AWS Graviton2, Ampere Altra): ARMv8.2 with NEON, no SVE.
CPU = "neoverse-n1"
#: CPython of the Debian release the host runs (bookworm: 3.11, the version of the host's venv).
PY = "3.11"
#: The newest torch with a CPU-only manylinux aarch64 wheel on PyPI (2.11 and later need CUDA wheels).
TORCH = "torch==2.10.0"
_DEBS = [f"python{PY}-minimal", f"libpython{PY}-minimal", f"libpython{PY}-stdlib", "libc6", "libstdc++6",
         "libgcc-s1", "libgomp1", "zlib1g", "libexpat1", "libffi8", "libbz2-1.0", "liblzma5", "libssl3",
         "libuuid1", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8"]
_TORCH_DEPS = ["filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec"]
_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64", "any"]
_READY = ".ready"


def prepare(root: Path) -> None:
    """Fetch the aarch64 interpreter and wheels into ``root`` unless they are there already."""
    if (root / _READY).exists():
        return
    if shutil.which("qemu-aarch64") is None:
        sys.exit("qemu-aarch64 not found: apt-get install qemu-user")
    from importlib.metadata import version

    root.mkdir(parents=True, exist_ok=True)
    state = root / "apt"
    for d in ("lists/partial", "cache/archives/partial", "debs"):
        (state / d).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    apt = ["apt-get", "-q", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
           "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
           "-o", f"Dir::State::status={state / 'status'}"]
    print(f"fetching Debian's arm64 python{PY} into {root / 'sysroot'}", file=sys.stderr)
    subprocess.run(apt + ["update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(apt + ["download"] + _DEBS, check=True, cwd=state / "debs", stdout=subprocess.DEVNULL)
    for deb in sorted((state / "debs").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root / "sysroot")], check=True)
    print(f"installing aarch64 wheels into {root / 'site'}", file=sys.stderr)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(root / "site"), "--only-binary=:all:",
           "--python-version", PY, "--implementation", "cp"] + [f"--platform={p}" for p in _PLATFORMS]
    pins = [f"{name}=={version(name)}" for name in ("apache-tvm", "apache-tvm-ffi", "numpy", "cryptography",
                                                      "pluggy", "PyYAML", "rich", "xxhash", "packaging")]
    subprocess.run(pip + pins + _TORCH_DEPS, check=True)
    subprocess.run(pip + ["--no-deps", "--upgrade", TORCH], check=True)
    (root / "handoff").unlink(missing_ok=True)
    (root / "handoff").symlink_to(Path(__file__).resolve().parent.parent / "core", target_is_directory=True)
    (root / _READY).touch()


def python(root: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``python3.11 argv`` for aarch64 under qemu-aarch64; output goes to this process's."""
    sysroot = root / "sysroot"
    env = {"QEMU_CPU": CPU, **env, "PYTHONPATH": os.pathsep.join([str(root), str(root / "site")]),
           "HANDOFF_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(["qemu-aarch64", "-L", str(sysroot), str(sysroot / "usr/bin" / f"python{PY}")] + argv,
                          env=env, check=True)
