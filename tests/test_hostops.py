"""The host-op allow-list (handoff.hostops): every entry is pure, and resolves in this torch."""

from __future__ import annotations

import pytest
import torch

from handoff import HandoffError, hostops


@pytest.mark.parametrize("target", sorted(hostops.HOST_OPS))
def test_every_allowed_op_is_pure_and_exists(target):
    op = hostops.resolve(target)
    schema = op._schema
    assert not schema.is_mutable, f"{target} mutates an argument"
    assert not any(a.is_out for a in schema.arguments), f"{target} has an out= argument"
    assert torch.Tag.nondeterministic_seeded not in op.tags, f"{target} is random"
    assert op.__name__.split(".")[0] not in ("empty", "empty_like", "empty_strided", "from_file", "save"), target
    assert all(str(r.type) in ("Tensor", "List[Tensor]") for r in schema.returns), \
        f"{target} returns something other than tensors"


@pytest.mark.parametrize("target, why", [
    ("aten.from_file.default", "host op 'aten.from_file.default' is not on the runtime's allow-list of pure ops"),
    ("aten.copy_.default", "host op 'aten.copy_.default' is not on the runtime's allow-list of pure ops"),
    ("aten.empty.memory_format", "is not on the runtime's allow-list"),
    ("os.system.default", "is in namespace 'os', which the runtime never runs on the host"),
    ("torchvision.nms.default", "is in namespace 'torchvision'"),
])
def test_dangerous_ops_are_refused(target, why):
    assert why in hostops.refusal(target)
    with pytest.raises(HandoffError, match="host op"):
        hostops.resolve(target)
