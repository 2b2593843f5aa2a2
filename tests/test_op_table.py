"""handoff.testing.check_op_table, the shared half of the plugins' tools/check_op_table.py, run
against the kitchen-sink backend: agreement, each kind of mismatch, bad samples, uncovered table
entries."""

from __future__ import annotations

import json

import pytest
import torch

from handoff.testing import Samples, check_op_table

A = torch.ops.aten


def _samples() -> Samples:
    samples = Samples(seed=3)
    x = samples.r(2, 8)
    samples.add(A.add.Tensor, "add", torch.add, x, samples.r(8))
    samples.add(A.mul.Tensor, "mul", torch.mul, x, samples.r(2, 8, lo=0.5))
    samples.add(A.sin.default, "sin", torch.sin, x)  # not claimed by default: the sink lowers it anyway
    samples.add(A.relu.default, "relu of a sum", lambda a: torch.relu(a + 1), x)  # two ops: a bad sample
    return samples


def _run(tmp_path, capsys, *args: str, samples=None, **kw) -> tuple[int, dict, str]:
    out = tmp_path / "rows.json"
    status = check_op_table("sink", _samples() if samples is None else samples,
                            ["--json", str(out), *args], plugin="kitchen_sink", **kw)
    return status, {r["sample"]: r for r in json.loads(out.read_text())["rows"]}, capsys.readouterr().out


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDOFF_HOME", str(tmp_path / "home"))


def test_claims_that_lower_and_match_agree(tmp_path, capsys):
    status, rows, out = _run(tmp_path, capsys, "-k", "add")
    assert status == 0 and list(rows) == ["add"]
    assert rows["add"]["verdict"] == "agree" and rows["add"]["claimed"] and rows["add"]["evaluated"]
    assert "1 samples over 1 ops" in out and "0 mismatch(es)" in out


def test_mismatches_are_reported_and_fail_the_run(tmp_path, capsys):
    status, rows, out = _run(tmp_path, capsys, "--option", "wrong_op=aten.mul.Tensor")
    assert status == 1
    assert rows["add"]["verdict"] == "agree"
    assert rows["mul"]["verdict"] == "MISMATCH: claimed, but it fails"
    assert rows["mul"]["detail"].startswith("numerics: max error")
    assert rows["sin"]["verdict"] == "MISMATCH: declined, but it compiles and matches"
    assert rows["relu of a sum"]["verdict"] == "bad sample"
    assert "MISMATCH: claimed, but it fails" in out and "3 mismatch(es)" in out


def test_a_claim_that_fails_to_lower_and_a_documented_decline(tmp_path, capsys):
    status, rows, _ = _run(tmp_path, capsys, "-k", "a", "--option", "fail_on=aten.add.Tensor",
                           "--option", "ops=aten.add.Tensor,aten.mul.Tensor,aten.sin.default",
                           documented=lambda node, reason: False)
    assert status == 1
    assert rows["add"]["verdict"] == "MISMATCH: claimed, but it fails"
    assert rows["add"]["detail"] == "compile: sink refuses aten.add.Tensor"
    status, rows, _ = _run(tmp_path, capsys, "-k", "sin", documented=lambda node, reason: node.target == A.sin.default)
    assert status == 0 and rows["sin"]["verdict"] == "documented (device-only bug, declined)"


def test_table_entries_without_a_sample_fail_the_run(tmp_path, capsys):
    status, _, out = _run(tmp_path, capsys, "--option", "ops=aten.add.Tensor,aten.mul.Tensor,aten.sin.default",
                          samples=_samples()[:3], table=[A.add.Tensor, A.neg.default])
    assert status == 1 and "table entries without a sample: aten.neg.default" in out


@pytest.mark.slow
def test_int8_claims_are_checked_op_by_op_on_tvm(tmp_path, capsys):
    """tvm claims the dq -> op -> q samples of conv2d, linear, add and relu, the 16-bit ones (uint16
    activations) and the per-channel-activation one, lowers them and matches eager torch within
    one quantization step."""
    from handoff.testing import int8_samples

    out = tmp_path / "rows.json"
    status = check_op_table("tvm", int8_samples(), ["--json", str(out)], plugin="handoff.tvm.plugin")
    rows = json.loads(out.read_text())["rows"]
    assert status == 0, capsys.readouterr().out
    assert [r["sample"] for r in rows] == ["int8 conv2d 3x3", "int8 linear", "int8 add", "int8 relu", "16a8w linear",
                                           "16-bit add", "int8 add, per-channel activations"]
    assert all(r["claimed"] and r["evaluated"] and r["verdict"] == "agree" for r in rows), rows


def test_a_quantized_output_is_checked_in_quantization_steps():
    from handoff.testing import mismatch

    want = torch.tensor([0.0, 0.5, 1.0])
    assert mismatch([(want + 0.1).numpy()], want, 1e-4, step=0.1) is None
    assert mismatch([(want + 0.25).numpy()], want, 1e-4, step=0.1) == \
        "2.50 quantization steps from eager (tolerance 1)"
    assert mismatch([(want + 6.4).numpy()], want, 1e-4, step=0.1, steps=64) is None  # a 16-bit sample's
    assert mismatch([(want + 7.0).numpy()], want, 1e-4, step=0.1, steps=64) == \
        "70.00 quantization steps from eager (tolerance 64)"


def test_a_quantized_sample_is_declined_with_its_quantize_ops(tmp_path, capsys):
    """Without ``neighbours``, a decline of a quantized sample's quantize/dequantize ops still
    declines the sample (they travel with its op in a partition); here the per-channel-activation
    sample on a backend that claims the add but not quantize_per_channel."""
    from handoff.testing import int8_samples

    samples = [s for s in int8_samples() if s.label == "int8 add, per-channel activations"]
    _, rows, _ = _run(tmp_path, capsys, "--option", "ops=aten.add.Tensor", samples=samples, neighbours=False)
    row = rows["int8 add, per-channel activations"]
    assert not row["claimed"], row
    assert row["reason"] == "sink has no kernel for quantized_decomposed.quantize_per_channel.default", row
    assert row["verdict"] == "agree", row  # the sink cannot lower the quantize ops either
