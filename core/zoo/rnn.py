"""Recurrent models: a network bandwidth estimator and a call-audio noise suppressor (imports
torch). The GRU is written out step by step with plain ops, as ``torch.export`` unrolls
``nn.GRU`` anyway, so a backend sees matrix products, sigmoids and tanhs, not an opaque op."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import BUILTIN
from ._weights import calibrated


class GRU(nn.Module):
    """A one-layer, batch-first GRU computing exactly what ``nn.GRU`` computes (Cho et al. 2014,
    PyTorch's gate order r, z, n), unrolled over a fixed sequence length. The input projection of
    every step is one matrix product over the whole sequence."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.input_proj = nn.Linear(inputs, 3 * hidden)
        self.hidden_proj = nn.Linear(hidden, 3 * hidden)
        bound = hidden ** -0.5  # nn.GRU's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: batch x time x inputs -> batch x time x hidden (every step's state)."""
        gi = self.input_proj(x)
        h = x.new_zeros(x.shape[0], self.hidden)
        states = []
        H = self.hidden
        for t in range(x.shape[1]):
            gh = self.hidden_proj(h)
            r = torch.sigmoid(gi[:, t, :H] + gh[:, :H])
            z = torch.sigmoid(gi[:, t, H:2 * H] + gh[:, H:2 * H])
            n = torch.tanh(gi[:, t, 2 * H:] + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * h
            states.append(h)
        return torch.stack(states, dim=1)


class BandwidthEstimator(nn.Module):
    """Estimate the available bandwidth of a call from the last packets: each packet's
    statistics (size, send and arrival gaps, delay, loss and reorder flags, ...) embedded, a GRU
    over the window, and a regression head on the last state (softplus: a rate is positive)."""

    def __init__(self, features: int = 8, embed: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(features, embed), nn.LayerNorm(embed), nn.ReLU())
        self.gru = GRU(embed, hidden)
        self.head = nn.Sequential(nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, packets: torch.Tensor) -> torch.Tensor:
        states = self.gru(self.embed(packets))
        return F.softplus(self.head(states[:, -1]))


class NoiseSuppressor(nn.Module):
    """Suppress noise in call audio, one spectrogram at a time: log-compressed magnitudes, two
    strided convolutions over time x frequency, a GRU over the frames, and a sigmoid mask per
    frequency bin that multiplies the input spectrum (a convolutional recurrent network, as in
    Tan & Wang 2018)."""

    def __init__(self, bins: int = 129, channels: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, (1, 2), 1, bias=False), nn.BatchNorm2d(channels), nn.ELU(),
            nn.Conv2d(channels, 2 * channels, 3, (1, 2), 1, bias=False), nn.BatchNorm2d(2 * channels), nn.ELU())
        reduced = (bins + 1) // 2
        reduced = (reduced + 1) // 2
        self.proj = nn.Linear(2 * channels * reduced, hidden)
        self.gru = GRU(hidden, hidden)
        self.mask = nn.Linear(hidden, bins)

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``spectrum``: batch x frames x bins (magnitudes; the sign is ignored) -> the same, denoised."""
        x = self.conv(torch.log1p(spectrum.abs()).unsqueeze(1))
        b, c, t, f = x.shape
        x = self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f))
        return torch.sigmoid(self.mask(self.gru(x))) * spectrum


def bandwidth_gru() -> nn.Module:
    """32 packets x 8 statistics -> estimated bits/s. Parameters: 21,281; FLOPs: 1,200,192."""
    torch.manual_seed(0)
    return calibrated(BandwidthEstimator(), BUILTIN["bandwidth_gru"].inputs, 9)


def noise_suppressor() -> nn.Module:
    """32 frames x 129 bins (16 kHz, 256-point FFT) -> denoised magnitudes.
    Parameters: 255,857; FLOPs: 26,330,112."""
    torch.manual_seed(0)
    return calibrated(NoiseSuppressor(), BUILTIN["noise_suppressor"].inputs, 10)
