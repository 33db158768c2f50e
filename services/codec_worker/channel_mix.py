"""Channel mixes (a weight applied at every time step) whose bits do not depend on
the shape of the batch they run in.

The streaming decoder must give a stream the same audio to the last bit however its
frames are chunked and batched, but a GEMM library picks kernels, blockings and
thread splits by shape, and a kernel change is a rounding change. Measured on CPU
(torch 2.13, MKL 2024.2 in its COMPATIBLE mode, numeric_mode.py; AMD EPYC, and the
same CPU taking MKL's Intel path; 1 to 3 threads), sgemm gives an output element
the same bits whatever the other rows and columns are, as long as, in BLAS's
column-major terms, m is a multiple of 16 and n a multiple of 8 (below that it
takes other kernels, and with several threads it splits m and n in those units, so
a thread's share is never smaller). MKL's default mode held with n a multiple of 4
on AMD, and did not hold at all on its Intel path. Neither torch's conv1d for 1x1 and dense convs
nor a GEMM on a strided view holds this at all. So every mix here is one GEMM on
contiguous operands with both shapes padded:

- by rows, x^T W^T on (batch * time) rows padded to a multiple of 8, for layers
  with few time steps a frame (the latents: 4): it streams the weights 2-6x faster
  than W @ x for such short inputs;
- by columns, W @ x per batch item with time padded to a multiple of 16, for the
  upsampled layers: no transposes of long activations.

Which one a layer uses is fixed when it is built (by its time steps a frame), never
by the shape of a step, and output channels are padded to a multiple of 16 once,
with zero weights. On CUDA the same code runs, but cuBLAS chooses kernels by shape
and makes no such promise.

In the decoder's bf16 precision (precision.py) a mix runs in bfloat16: weights
rounded once, the input rounded at each call, and torch hands the GEMM to oneDNN's
brgemm matmul (avx512_core_bf16 on AVX512-BF16 CPUs, AMX on Intel's newer ones),
which accumulates in float32 and rounds its output to bfloat16; the output goes
back to float32, as do the bias and everything outside the mix. Measured the same
way (torch 2.13, oneDNN 3.12, AMD EPYC with AVX512-BF16, 1 to 3 threads), every
layer shape of the 24 kHz decoder gave each element the same bits in any batch,
with the padding above and also without it; the padding stays, one code path for
both (tests/codec_worker/test_decoder_precision.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_MULTIPLE = 8  # BLAS n when mixing by rows
TIME_MULTIPLE = 16  # BLAS m when mixing by columns
OUT_MULTIPLE = 16  # BLAS m by rows, n by columns


def _pad(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """t, zero-padded along `dim` to a multiple, and contiguous."""
    missing = -t.shape[dim] % multiple
    if not missing:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat((t, t.new_zeros(shape)), dim=dim)


def mix_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rows (M, in) times weight (out, in)^T plus bias: (M, out). `weight` must have
    a multiple of OUT_MULTIPLE rows (ChannelMix pads them)."""
    m = rows.shape[0]
    y = F.linear(_pad(rows, 0, ROW_MULTIPLE), weight, bias)
    return y[:m] if y.shape[0] != m else y


class ChannelMix:
    """weight (out, in) and an optional bias (out,) applied at every time step, the
    product computed in `dtype` (float32, or bfloat16 with the bias added after, in
    the input's dtype)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, steps_per_frame: int, dtype: torch.dtype | None = None
    ) -> None:
        self.out_channels = weight.shape[0]
        weight = weight.detach()
        self.dtype = weight.dtype if dtype is None else dtype
        self.weight = _pad(weight.to(self.dtype), 0, OUT_MULTIPLE)
        self.bias = None if bias is None else _pad(bias.detach(), 0, OUT_MULTIPLE)
        # The bias joins the product only where the product is in the bias's dtype.
        self._bias_in_product = self.bias is not None and self.bias.dtype == self.dtype
        self.by_rows = steps_per_frame < TIME_MULTIPLE

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in, T) -> (B, out, T) in x's dtype; x possibly a strided view."""
        batch, channels, steps = x.shape
        out_dtype = x.dtype
        bias = self.bias if self._bias_in_product else None
        if self.by_rows:
            rows = x.transpose(1, 2).reshape(batch * steps, channels).to(self.dtype)
            y = mix_rows(rows, self.weight, bias).to(out_dtype)
            if self.bias is not None and bias is None:
                y.add_(self.bias)
            y = y.view(batch, steps, -1).transpose(1, 2)
        else:
            y = torch.matmul(self.weight, _pad(x.to(self.dtype), 2, TIME_MULTIPLE))
            if y.dtype != out_dtype:
                y = y[..., :steps].to(out_dtype)
            if self.bias is not None:
                y.add_(self.bias.view(-1, 1))
            y = y[..., :steps]
        return y[:, : self.out_channels] if y.shape[1] != self.out_channels else y
