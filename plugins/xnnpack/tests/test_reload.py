"""A core feature run with the real xnnpack runtime: loading a recorded program again in a process.

The core hands out the same immutable bytes for a small recorded file opened again unchanged
(``handoff.program``, docs/plugins.md), and the xnnpack runtime then reuses the ``.pte`` it made;
a file changed since must be read and checked again, and a damaged one refused with one line.
Uses the core's internals (``handoff.verified``): listed in tests/test_contract.py's
``CORE_FEATURE_TESTS``.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.backends.xnnpack")

import handoff  # noqa: E402
from handoff import ProgramFormatError, verified  # noqa: E402
from handoff.testing import assert_matches_eager  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_a_program_loaded_again_shares_its_pte_until_the_file_changes(plugins, tmp_path, monkeypatch, mapped):
    """Loaded and run three times against eager: the later loads run from the .pte an earlier one
    made (by ``handoff.blob_key``, for a file read into memory and a mapped one alike, from the
    first load after the file was recorded: here the first, as ``partition`` records what it
    writes), with the inputs read
    from the same read-only manifest the first load read; then damaged in place (modification
    time put back), the next load refuses the file with the one-line error naming the segment
    and its offset."""
    from handoff import program as core_program
    from handoff_xnnpack import runtime as xnnpack_runtime

    if mapped:
        monkeypatch.setattr(core_program, "READ_BELOW_BYTES", 0)  # as a file over 1 MiB
    monkeypatch.setattr(xnnpack_runtime, "_PTES", {})  # none kept from other tests

    specs_read = []
    real = xnnpack_runtime._input_specs
    monkeypatch.setattr(xnnpack_runtime, "_input_specs", lambda m: specs_read.append(1) or real(m))

    zoo = plugins.zoo()["small_cnn"]
    model = zoo.build().eval()
    path = tmp_path / "cnn.hof"
    handoff.partition(model, zoo.example_inputs(), backends=["xnnpack"], fallback=False).write(str(path))
    verified.wait_until_not_racy(os.stat(path))
    ptes, outs = [], []
    for seed in (1, 2, 3):  # fresh inputs each time
        (x,) = zoo.example_inputs(seed)
        with handoff.load(path) as program, torch.no_grad():
            outs.append(program.run([x.numpy()])[0])
            assert_matches_eager(outs[-1], model(x))
            ptes.append({id(pte) for _, pte in xnnpack_runtime._PTES.values()})
            assert (program.file._mmap is not None) == mapped
            entry = program.manifest["segments"][program.manifest["delegates"][0]["segment"]]
    assert program.file.recorded and len(ptes[2]) == 1 and ptes[1] == ptes[2]  # no new .pte for the unchanged file
    assert specs_read == [1]  # the later loads' manifest is the first one's: its input_specs read once
    assert not torch.allclose(torch.from_numpy(outs[0]), torch.from_numpy(outs[1])), "outputs must change with the input"
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(entry["offset"] + entry["length"] // 2)
        byte = f.read(1)
        f.seek(entry["offset"] + entry["length"] // 2)
        f.write(bytes([byte[0] ^ 0xA5]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ProgramFormatError) as info:
        handoff.load(path)
    assert "\n" not in str(info.value)
    assert f".xxh3 at offset {entry['offset']}: does not match the segment's bytes (file corrupted)" in str(info.value)
