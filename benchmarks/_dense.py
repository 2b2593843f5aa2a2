"""One dense layer (64x512 @ 512x512 + bias): a single MetaSchedule task, so ``tvm_tuning.py
--rpc --trials 64`` is one round of 64 candidates and the farm's share of the wall time shows::

    python benchmarks/tvm_tuning.py --rpc HOST:PORT --key one,two --model benchmarks/_dense.py:Dense --trials 64
"""

import torch


class Dense(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(512, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(64, 512),)
