"""Trust: signed programs, native code only from trusted signers, an authenticated lowering cache,
and model files that would run pickles."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import handoff
from handoff import HandoffError, native
from handoff.cli import main
from handoff.program import ProgramFile, program_bytes


class Tiny(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2.0 + 1.0


@pytest.fixture
def tvm_program(tmp_path):
    """A one-delegate tvm program (native code), signed by the test's local key, and the home it
    was made in."""
    result = handoff.partition(Tiny(), (torch.randn(2, 8),), backends=["tvm"],
                               default_limits=handoff.Limits(min_size=1))
    path = tmp_path / "tiny.hof"
    result.write(str(path))
    return path, Path(os.environ["HANDOFF_HOME"])


def _other_home(tmp_path, monkeypatch, name="other"):
    home = tmp_path / name
    monkeypatch.setenv("HANDOFF_HOME", str(home))
    native._APPROVED.clear()  # a new process: nothing approved yet
    return home


def test_partition_signs_and_the_local_key_is_trusted(tvm_program):
    path, _ = tvm_program
    with ProgramFile.open(str(path)) as pf:
        (sig,) = pf.manifest["signatures"]
        assert len(sig["key"]) == 64 and len(sig["signature"]) == 128
    with handoff.load(path) as program:
        assert program.trust.startswith("signed by key ") and program.trust.endswith("(trusted: the local key)")
        x = np.random.randn(2, 8).astype(np.float32)
        np.testing.assert_allclose(program.run([x])[0], Tiny()(torch.from_numpy(x)).numpy(), rtol=1e-6)


def test_native_code_from_an_untrusted_signer_is_refused(tvm_program, tmp_path, monkeypatch, capsys):
    path, home = tvm_program
    _other_home(tmp_path, monkeypatch)
    with pytest.raises(HandoffError) as err:
        handoff.load(path)
    assert str(err.value).startswith(f"{path}: delegate 0 (tvm_0, backend 'tvm') is native code and the program is "
                                     f"signed by key ")
    assert str(err.value).endswith("which is not trusted here; load it only if you trust it: add the signer's public "
                                   "key with --trusted-keys DIR (or to $HANDOFF_HOME/trusted), or pass --allow-unsigned")
    assert main(["run", str(path)]) == 1 and "is native code" in capsys.readouterr().err
    with handoff.load(path, allow_unsigned=True) as program:
        assert program.trust == "unsigned, allowed by --allow-unsigned"

    # the signer's public key, exported on its machine, in a --trusted-keys directory
    monkeypatch.setenv("HANDOFF_HOME", str(home))
    assert main(["key"]) == 0
    pem = capsys.readouterr().out.split("\n", 1)[1]
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "alice.pem").write_text(pem)
    _other_home(tmp_path, monkeypatch, "third")
    with handoff.load(path, trusted_keys=[keys]) as program:
        assert program.trust.endswith(f"(trusted: {keys / 'alice.pem'})")
    # or trusted for good with `handoff key --trust`
    native._APPROVED.clear()
    assert main(["key", "--trust", str(keys / "alice.pem")]) == 0
    with handoff.load(path) as program:
        assert "trusted: " in program.trust and "/trusted/" in program.trust


def test_data_only_programs_load_unsigned(sink_plugins, tmp_path, monkeypatch):
    import kitchen_sink

    result = handoff.partition(kitchen_sink.sink_net(), (torch.randn(2, 8),), backends=["sink"], fallback=False)
    data = result.to_bytes(sign=False)
    _other_home(tmp_path, monkeypatch)
    with handoff.load(data) as program:
        assert program.trust is None
        program.run([np.ones((2, 8), np.float32)])


def test_a_changed_native_segment_is_refused(tvm_program):
    """A file whose library was swapped after signing: rewritten, it is unsigned; with the old
    signature carried over, the signature no longer verifies."""
    path, _ = tvm_program
    with ProgramFile.open(str(path)) as pf:
        (old_signature,) = pf.manifest["signatures"]
        manifest = {k: v for k, v in pf.manifest.items() if k not in ("segments", "signatures")}
        lib = bytearray(pf.segment(0))
    lib[len(lib) // 2] ^= 0xFF
    with pytest.raises(HandoffError, match="is native code and the program is not signed"):
        handoff.load(program_bytes(manifest, [bytes(lib)]))

    class Replay:  # a forger who copies the old signature into the new file
        def sign(self, _manifest):
            return old_signature

    with pytest.raises(HandoffError, match="its signature by key [0-9a-f]{16} does not verify"):
        handoff.load(program_bytes(manifest, [bytes(lib)], signer=Replay()))


def test_native_library_refuses_unapproved_bytes():
    with pytest.raises(HandoffError, match=r"tvm delegate: native code with sha256 [0-9a-f]{16}… was not approved"):
        with native.native_library(b"\x7fELF not approved", "tvm delegate"):
            pass
    native.approve(native.sha256(b"approved"))
    with native.native_library(b"approved", "d") as path:
        assert Path(path).read_bytes() == b"approved" and oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert not Path(path).exists() and not Path(path).parent.exists()


def test_a_replaced_cache_entry_is_a_miss(sink_plugins):
    """Replacing a cached blob and its recorded digest must not make a later partition embed it."""
    import kitchen_sink

    from handoff.cache import LoweringCache

    model, x = kitchen_sink.sink_net(), torch.randn(2, 8)
    handoff.partition(model, (x,), backends=["sink"], fallback=False)
    cache = LoweringCache()
    for meta_path in cache.root.glob("*.json"):
        key = meta_path.stem
        evil = b"SINK" + b"\0" * 8
        (cache.root / f"{key}.blob").write_bytes(evil)
        meta = json.loads(meta_path.read_text())
        import hashlib

        meta["sha256"] = hashlib.sha256(evil).hexdigest()
        meta_path.write_text(json.dumps(meta))
        assert cache.get(key) is None
    again = handoff.partition(model, (x,), backends=["sink"], fallback=False)
    assert again.report.stats["sink"].cached_partitions == 0


def test_sign_verify_commands(tvm_program, tmp_path, monkeypatch, capsys):
    path, home = tvm_program
    assert main(["verify", str(path)]) == 0
    assert "every segment intact; signed by key" in capsys.readouterr().out
    _other_home(tmp_path, monkeypatch)
    assert main(["verify", str(path)]) == 1
    assert "which is not trusted here" in capsys.readouterr().err
    signed = tmp_path / "mine.hof"
    assert main(["sign", str(path), "-o", str(signed)]) == 0
    assert main(["verify", str(signed)]) == 0 and "(trusted: the local key)" in capsys.readouterr().out
    assert main(["sign", str(path), "--key", str(tmp_path / "nope.pem")]) == 1
    assert "--key " in capsys.readouterr().err


# -- model files -----------------------------------------------------------------------------------

class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class _Boom:
    def __reduce__(self):
        return (Path.write_text, (Path(os.environ["HANDOFF_PICKLE_MARKER"]), "pwned"))


def _pt2(tmp_path) -> Path:
    path = tmp_path / "lin.pt2"
    torch.export.save(torch.export.export(Lin(), (torch.randn(2, 4),)), str(path))
    return path


def _replace_member(path: Path, suffix: str, data: bytes, out: Path) -> Path:
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith(suffix) else src.read(info.filename))
    return out


def test_pt2_whose_example_inputs_are_a_pickle_is_refused(sink_plugins, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("HANDOFF_PICKLE_MARKER", str(marker))
    evil = _replace_member(_pt2(tmp_path), "sample_inputs/model.pt", pickle.dumps(_Boom()), tmp_path / "evil.pt2")
    with pytest.raises(HandoffError, match=r"evil.pt2: its example inputs are a pickle beyond torch's restricted "
                                           r"unpickler, which runs code when loaded; .*pass --trust-model"):
        handoff.partition(str(evil), backends=["sink"], fallback=False)
    assert not marker.exists()


def test_pt2_with_pickled_weights_needs_trust_model(sink_plugins, tmp_path):
    path = _pt2(tmp_path)
    with zipfile.ZipFile(path) as z:
        config_name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(config_name))
    entry = config["config"]["fc.weight"]
    entry["use_pickle"] = True
    buf = io.BytesIO()
    torch.save(Lin().fc.weight, buf)  # a Parameter, as torch.export.save pickles one
    pickled = _replace_member(path, "_weights_config.json", json.dumps(config).encode(), tmp_path / "tmp.pt2")
    pickled = _replace_member(pickled, f"weights/{entry['path_name']}", buf.getvalue(), tmp_path / "pickled.pt2")
    with pytest.raises(HandoffError, match=r"pickled.pt2: it holds a pickled object \(fc.weight\), which runs code "
                                           r"when loaded; a .pt2 file is code you run \(like a .py\): pass --trust-model"):
        handoff.partition(str(pickled), backends=["sink"], fallback=False)
    result = handoff.partition(str(pickled), backends=["sink"], fallback=False, trust_model=True)
    assert result.report.total_nodes > 0
    plain = handoff.partition(str(path), backends=["sink"], fallback=False)  # an ordinary .pt2 needs no flag
    assert plain.report.total_nodes > 0
