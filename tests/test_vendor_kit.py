"""The vendor workflow end to end, outside the source tree: the core and every plugin built as
wheels (as ``make wheels`` does), installed into a fresh virtual environment, a zoo model
partitioned and run with each installed backend, and docs/plugin-guide.md's walk-through run as
written (``handoff new-backend``, install, ``pytest`` with the conformance suite, wheel, publish).

The fresh environment gets handoff and its plugins only from the wheels; third-party packages
(torch, TVM, ExecuTorch... too large to install per test) come from this environment's
site-packages through a directory of links that leaves out every handoff distribution and
editable-install hook, so nothing of the source tree is importable there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())
#: The suite's cases the walk-through's ``pytest`` runs (the full catalogue is for vendors' CI).
SUBSET = "--handoff-cases add,relu,sigmoid,mul_scalar,conv2d,zoo_small_cnn --handoff-examples 1 --handoff-zoo small_cnn"


def _run(cmd: list[str] | str, env: dict[str, str], cwd: Path, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _third_party(tmp: Path) -> Path:
    """Links to everything in this environment's site-packages but handoff's own distributions."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = tmp / "third_party"
    out.mkdir()
    own = re.compile(r"^(__editable__|handoff)", re.I)
    for entry in site.iterdir():
        if not own.match(entry.name) and not entry.name.endswith(".pth"):
            (out / entry.name).symlink_to(entry)
    return out


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vendor")
    env = {k: v for k, v in os.environ.items() if k not in ("HANDOFF_DISABLE_PLUGIN_AUTOLOAD", "PYTHONPATH",
                                                              "HANDOFF_PLUGINS", "VIRTUAL_ENV")}
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT), *map(str, PLUGINS)],
         env, tmp)
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env, tmp)
    purelib = subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                       "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    Path(purelib, "third_party.pth").write_text(str(_third_party(tmp)) + "\n")
    # pytest itself too: a linked package gets no console script, and the guide runs `pytest`
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
          f"pytest=={pytest.__version__}", *map(str, sorted(dist.glob("*.whl")))], env, tmp)
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv),
               HANDOFF_HOME=str(tmp / "home"), PIP_NO_DEPS="1")
    return {"tmp": tmp, "env": env, "dist": dist, "venv": venv}


@pytest.mark.slow
def test_wheels_install_and_every_backend_runs_a_zoo_model(fresh_env):
    env, tmp = fresh_env["env"], fresh_env["tmp"]
    wheels = sorted(p.name for p in fresh_env["dist"].glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["handoff", "handoff_coreml", "handoff_qnn", "handoff_vulkan",
                                                 "handoff_xnnpack"]
    where = _run(["python", "-c", "import handoff, handoff_xnnpack, sys; print(handoff.__file__); "
                  "print(handoff_xnnpack.__file__); print(sys.path)"], env, tmp)
    assert where.count(str(fresh_env["venv"])) >= 2 and str(ROOT) not in where, where
    # `handoff backends --json`, then `handoff backends`, in one process: the listing imports every
    # backend's compiler (torch, TVM, ExecuTorch, onnxruntime, coremltools), ~20 s a process on 2 cores
    listing, table = _run(["python", "-c", "import sys; from handoff.cli import main; rc = main(['backends', '--json']); "
                           "print('\\f', flush=True); sys.exit(rc or main(['backends']))"], env, tmp).split("\f\n", 1)
    listed = json.loads(listing)
    rows = {r["id"]: r for r in listed["backends"]}
    for bid, dist in (("tvm", "handoff"), ("xnnpack", "handoff-xnnpack"), ("qnn", "handoff-qnn"),
                      ("vulkan", "handoff-vulkan")):
        assert rows[bid]["distribution"] == dist and rows[bid]["distribution_version"] == "0.1.0", rows[bid]
        assert rows[bid]["aot"] and rows[bid]["runtime"], rows[bid]
    assert rows["coreml"]["distribution"] == "handoff-coreml", rows["coreml"]  # lowers here, runs on Apple only
    assert "handoff-xnnpack 0.1.0" in table, table
    for bid in ("xnnpack", "qnn", "vulkan", "tvm"):
        _run(["handoff", "partition", "zoo:small_cnn", "--backends", bid, "-o", f"{bid}.hof"], env, tmp)
        out = _run(["handoff", "run", f"{bid}.hof"], env, tmp)
        assert "first run" in out, out
        manifest = json.loads(_run(["handoff", "inspect", f"{bid}.hof", "--json"], env, tmp))
        assert bid in {d["backend"] for d in manifest["delegates"]}


def _guide_commands() -> list[str]:
    text = (ROOT / "docs" / "plugin-guide.md").read_text()
    block = text.split("<!-- tested:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_plugin_guide_walkthrough_scaffolds_a_backend_that_passes_its_tests(fresh_env):
    """docs/plugin-guide.md's commands, in one shell, in the fresh environment: the generated
    package installs, passes its own tests and the conformance suite (a subset of the cases, given
    through PYTEST_ADDOPTS), builds a wheel, and partitions and runs a zoo model."""
    env = dict(fresh_env["env"], PYTEST_ADDOPTS=SUBSET + " -p no:cacheprovider")
    work = fresh_env["tmp"] / "guide"
    work.mkdir()
    commands = _guide_commands()
    assert commands[0].startswith("handoff new-backend acme") and "pytest" in commands
    out = _run("set -e -x\n" + "\n".join(commands), env, work, timeout=1500)
    assert "acme" in out and "handoff-acme 0.1.0" in out
    summary = out.split("handoff conformance", 1)[1]
    row = next(line.split() for line in summary.splitlines() if line.startswith("acme"))
    assert row[4] == "0" and row[-1] == "5/5", summary  # no failure; every contract check passed
    assert (work / "handoff-acme" / "dist" / "handoff_acme-0.1.0-py3-none-any.whl").exists()
    assert (work / "handoff-acme" / "cnn.hof").exists()
