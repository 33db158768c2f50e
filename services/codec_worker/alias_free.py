"""The anti-aliased SnakeBeta activation of NeuCodec's acoustic encoder.

A periodic activation (SnakeBeta: x + sin²(αx)/β) creates harmonics above the Nyquist
frequency, which would fold back into the band. NeuCodec (after BigVGAN and
alias-free-torch) therefore runs it at twice the rate: upsample by 2 with a
windowed-sinc low-pass, apply the activation, low-pass and drop every other sample.
The two filters are the same 12-tap Kaiser-windowed sinc (cutoff a quarter of the
doubled rate, transition half-width 0.3 of it); they are computed here rather than read
from a checkpoint, so a checkpoint's copies of them (`....filter`) are not needed.

Written from neucodec 0.0.6 (activations.SnakeBeta, alias_free_torch.Activation1d,
UpSample1d, DownSample1d, LowPassFilter1d, kaiser_sinc_filter1d), with the same
arithmetic and the same replicate padding at the edges; the parameter names
(`act.alpha`, `act.beta`) are neucodec's, so a checkpoint loads by path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RATIO = 2
KERNEL_SIZE = 12
CUTOFF = 0.5 / RATIO
HALF_WIDTH = 0.6 / RATIO


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A low-pass FIR filter of `kernel_size` taps, as a 1-D float32 tensor summing to 1.

    cutoff and half_width are fractions of the sampling rate (0.5 is Nyquist). The
    Kaiser window's beta follows Kaiser's formula for the attenuation that the
    transition width and length give; the taps sit at half-integer times for an even
    length (the filter is then centred between two samples), at integers otherwise.
    """
    if not 0 < cutoff <= 0.5:
        raise ValueError(f"cutoff must lie in (0, 0.5], got {cutoff}")
    if kernel_size < 2:
        raise ValueError(f"kernel_size must be at least 2, got {kernel_size}")
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    if kernel_size % 2 == 0:
        time = torch.arange(-half, half) + 0.5
    else:
        time = (torch.arange(kernel_size) - half).to(torch.float32)
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return taps / taps.sum()  # a constant passes unchanged


class SnakeBeta(nn.Module):
    """x + sin²(αx) / β per channel, α and β stored as logarithms (neucodec's
    alpha_logscale=True); 1e-9 keeps a vanishing β from dividing by zero."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, channels, time)
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class Activation1d(nn.Module):
    """upsample x2 -> activation -> low-pass and downsample x2: (batch, channels, time)
    in, the same shape out."""

    # Upsampling: replicate-pad by PAD, transposed convolution of stride 2, then cut
    # the filter's spread (_UP_CUT each side) so that 2 * time samples remain.
    _PAD = KERNEL_SIZE // RATIO - 1
    _UP_LEFT = _PAD * RATIO + (KERNEL_SIZE - RATIO) // 2
    _UP_RIGHT = _PAD * RATIO + (KERNEL_SIZE - RATIO + 1) // 2
    # Downsampling: replicate-pad so that the even-length filter is centred.
    _DOWN_LEFT = KERNEL_SIZE // 2 - int(KERNEL_SIZE % 2 == 0)
    _DOWN_RIGHT = KERNEL_SIZE // 2

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        taps = kaiser_sinc_filter(CUTOFF, HALF_WIDTH, KERNEL_SIZE)
        self.register_buffer("taps", taps.view(1, 1, KERNEL_SIZE), persistent=False)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self._PAD, self._PAD), mode="replicate")
        x = RATIO * F.conv_transpose1d(x, self.taps.expand(channels, -1, -1), stride=RATIO, groups=channels)
        return x[..., self._UP_LEFT : -self._UP_RIGHT]

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self._DOWN_LEFT, self._DOWN_RIGHT), mode="replicate")
        return F.conv1d(x, self.taps.expand(channels, -1, -1), stride=RATIO, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))
