"""Strategy specs: parsing, YAML files, and auto's enumeration."""

from __future__ import annotations

import pytest

from handoff.errors import HandoffError
from handoff.strategies import auto, load_file, parse, unique


def test_parse_backends_and_options():
    s = parse("qnn[precision=fp16,soc_model=SM8650],xnnpack")
    assert s.backends == ("qnn", "xnnpack") and s.name == "qnn[precision=fp16,soc_model=SM8650],xnnpack"
    assert s.options == {"qnn": {"precision": "fp16", "soc_model": "SM8650"}}
    assert s.spec == "qnn[precision=fp16,soc_model=SM8650],xnnpack" and s.fallback
    # a piece without '=' continues the previous value: option values may hold commas
    s = parse("sink[ops=aten.add.Tensor,aten.mul.Tensor,fuse=1], sinkb")
    assert s.options == {"sink": {"ops": "aten.add.Tensor,aten.mul.Tensor", "fuse": "1"}}
    assert s.backends == ("sink", "sinkb")
    assert parse("tvm[tune=200]").options == {"tvm": {"tune": "200"}}


@pytest.mark.parametrize("text, message", [
    ("", "an empty strategy"),
    ("qnn[precision=fp16", "'[' without ']'"),
    ("qnn]", "']' without '['"),
    ("qnn,qnn", "names backend 'qnn' twice"),
    ("qnn[fp16]", "option 'fp16' of 'qnn' is not NAME=VALUE"),
    ("[x=1]", "is not a backend id"),
])
def test_parse_errors_say_what_to_write(text, message):
    with pytest.raises(HandoffError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text)


def test_yaml_file_names_and_describes_strategies(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("""
strategies:
  - name: npu-fp16
    description: QNN in fp16, XNNPACK for the rest
    backends: qnn[precision=fp16],xnnpack
    options: {qnn: {soc_model: SM8650}}
  - backends: [xnnpack, tvm]
    fallback: false
  - vulkan
  - {name: vulkan-unfolded, backends: vulkan, fold: false}
""")
    a, b, c, d = load_file(path)
    assert (a.name, a.description, a.backends) == ("npu-fp16", "QNN in fp16, XNNPACK for the rest", ("qnn", "xnnpack"))
    assert a.options == {"qnn": {"precision": "fp16", "soc_model": "SM8650"}}
    assert (b.name, b.backends, b.fallback) == ("xnnpack,tvm", ("xnnpack", "tvm"), False)
    assert c.backends == ("vulkan",) and c.fold and a.fold and b.fold
    assert (d.name, d.backends, d.fold, d.to_json()["fold"]) == ("vulkan-unfolded", ("vulkan",), False, False)


@pytest.mark.parametrize("text, message", [
    ("[]", "expected a list of strategies"),
    ("- {name: x}", "entry 1: expected a strategy string or a mapping with 'backends'"),
    ("- {backends: qnn, speed: 3}", "entry 1: unknown key\\(s\\) speed; valid keys: name, description"),
    ("- {backends: qnn, options: {xnnpack: {threads: 2}}}", "options for 'xnnpack', which its backends \\(qnn\\)"),
    ("- {backends: qnn, fallback: maybe}", "'fallback' must be true or false"),
    ("- {backends: qnn, fold: 0}", "'fold' must be true or false"),
    ("- [unclosed", "not valid YAML"),
])
def test_yaml_errors(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(HandoffError, match=message):
        load_file(path)
    with pytest.raises(HandoffError, match="cannot read it"):
        load_file(tmp_path / "missing.yaml")


def test_auto_enumerates_singles_option_values_and_ordered_pairs(sink_plugins):
    specs = [s.spec for s in auto(sink_plugins)]
    # tvm marks tune=200 worth comparing (Option.compare); the vendor backends pair both ways
    assert specs == ["sink", "sinkb", "tvm", "tvm[tune=200]", "sink,sinkb", "sinkb,sink"]


def test_unique_drops_repeats_and_keeps_names_distinct():
    out = unique([parse("xnnpack"), parse("xnnpack"), parse("qnn", name="xnnpack")])
    assert [(s.name, s.spec) for s in out] == [("xnnpack", "xnnpack"), ("xnnpack (2)", "qnn")]


def test_skip_leaves_out_strategies_by_spec_or_name():
    from handoff.strategies import skip

    strategies = [parse("tvm"), parse("tvm[tune=200,mcpu=znver3]"), parse("xnnpack", name="cpu")]
    assert [s.spec for s in skip(strategies, ["tvm[mcpu=znver3, tune=200]", "cpu"])] == ["tvm"]
    with pytest.raises(HandoffError, match=r"^--skip tvm\[tune=20\]: no such strategy; the strategies are: tvm, "
                                           r"tvm\[tune=200,mcpu=znver3\], xnnpack$"):
        skip(strategies, ["tvm[tune=20]"])
