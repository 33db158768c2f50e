"""A stateful streaming SNAC decoder that computes every output sample exactly once.

The usual Orpheus decoder re-decodes a 4-frame window for every frame it emits (4x
the compute, seams at ~44 dB SNR, and the first and last frames lost). SNAC's decoder
is purely convolutional, so it can instead run layer by layer on just the new
samples, each layer keeping only the input it still needs:

- a 'same' conv with padding p keeps its last 2p inputs (it starts with p zeros,
  which is the left padding of the whole-sequence decode) and runs unpadded over
  cache + new input;
- a transposed conv (kernel 2s, stride s, padding s/2) overlap-adds each call's
  output onto the tail carried from the previous call: every input sample is
  multiplied into the kernel once, and s positions stay open until the next input
  arrives. The first s/2 positions of the stream are the padding crop;
- a residual unit delays its skip path by whatever its branch still holds back;
- pointwise layers (Snake, 1x1 convs, noise, tanh) just apply; noise takes each
  position's value once, from its absolute position.

Flushing pushes the right-hand zero padding through, so that N frames give exactly
N * 2048 samples equal to `SNAC.decode` of the whole sequence (noise off). The first
audio needs only the decoder's reach (4,757 samples, 2.32 frames) of lookahead.

The quantizer is frame-local (1x1 projections, repeat_interleave by the vq strides
lines up with frame boundaries), so each step turns only its new frames into 4
latent steps a frame.

State lives outside the layers, as one flat list of tensors per stream, so that
streams whose caches have the same shapes can be stacked along the batch dimension
and decoded in one forward. This module knows nothing of gRPC or threads.

Bit-exact however it is driven. A stream's audio is the same to the last bit (so
its int16 PCM is the same sample for sample) however its frames are split into
steps, whichever streams share its forwards, however many torch threads run them,
and after a resume from zero state with at least 3 frames of context (the
failover); on CPU (torch 2.13, MKL) this is measured, not assumed
(tests/codec_worker/test_codec_determinism.py). It holds because every output element is
computed by arithmetic that does not depend on the shape around it:

- channel mixes (1x1 convs, the transposed convs' products, the quantizer's
  projections, dense convs as one mix per tap summed in a fixed order) are GEMMs
  with their shapes padded so that MKL keeps one kernel per element
  (channel_mix.py); torch's conv1d for 1x1 and dense convs is not bit-exact
  across shapes at all;
- depthwise convs stay on conv1d, which holds for every batch, length, memory
  layout and thread count measured;
- everything else is elementwise (sin through MKL VML, which holds at any offset)
  or IEEE add/mul, exact by definition; nothing reduces across positions;
- noise is keyed by (seed, noise layer, absolute position), see keyed_noise.py.

The engine may therefore chunk and batch freely: there is no constraint on frames
per step, batch partners or thread counts. A resume needs its context frames to
cover the decoder's reach (2.32 frames; the token server resends 3), nothing else. On CUDA the same code runs, but cuBLAS
and cuDNN choose kernels by shape, so bit-exactness there is not claimed.

Two precisions (precision.py), each exact in that sense, with bits of its own:
`fp32` is the above; `bf16` runs the channel mixes, which are the decoder's dense
and transposed convs and ~60% of its time, in bfloat16 through oneDNN (channel_mix.py),
3-4x faster per GEMM on AVX512-BF16. The rest stays float32: depthwise convs took
longer in bfloat16 (the casts cost more than the memory-bound conv saves), Snake and
the sums would lose precision for little time, the quantizer's projections are tiny,
and the state between steps is float32 in both, so their shapes and batching rules
are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from snac.layers import DecoderBlock, NoiseBlock, ResidualUnit, Snake1d
from torch import nn

from chorus.speech.orpheus import (
    CODEBOOK_SIZE,
    CODES_PER_FRAME,
    FRAME_SECONDS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    frames_to_layers,
)
from services.codec_worker import keyed_noise
from services.codec_worker import numeric_mode
from services.codec_worker.channel_mix import ChannelMix, mix_rows
from services.codec_worker.precision import PRECISIONS

# Tensors of one stream (batch 1) or of a stacked group (batch B), one per slot.
State = list[torch.Tensor]


@dataclass
class _StepContext:
    # (B, 1, 1) with 1 where a stream wants noise, or None when no stream does.
    noise_mask: torch.Tensor | None
    # (B,) uint64: each stream's noise seed.
    seeds: np.ndarray
    # (B, noise layers) int64: each noise layer's absolute position of its next
    # output, per stream; the noise layers advance it.
    noise_positions: np.ndarray


class _Layer:
    """One streaming layer. `step` gets a non-empty chunk of new input and returns
    the new outputs it can now complete (None when none yet); `flush` returns the
    rest, as if the input were followed by the whole-sequence right padding."""

    def initial_state(self, device: torch.device, dtype: torch.dtype) -> State:
        return []

    def bind(self, first_slot: int) -> int:
        """Takes state slots from `first_slot` on; returns the next free slot."""
        return first_slot

    def step(self, x: torch.Tensor, st: State, ctx: _StepContext) -> torch.Tensor | None:
        raise NotImplementedError

    def flush(self, st: State, ctx: _StepContext) -> torch.Tensor | None:
        return None


class _StatefulLayer(_Layer):
    slot = -1

    def bind(self, first_slot: int) -> int:
        self.slot = first_slot
        return first_slot + 1


class _Snake(_Layer):
    """snac's `snake`, the same arithmetic in the same order, but eager and in place:
    the TorchScript original re-profiles and re-optimizes as chunk lengths change,
    which stalls the first steps of a stream for seconds."""

    def __init__(self, module: Snake1d) -> None:
        self.alpha = module.alpha.detach()
        self.inv_alpha = (self.alpha + 1e-9).reciprocal()

    def step(self, x, st, ctx):
        y = torch.mul(x, self.alpha).sin_().square_().mul_(self.inv_alpha)
        return y.add_(x)


class _Tanh(_Layer):
    def step(self, x, st, ctx):
        return torch.tanh(x)


class _Noise(_Layer):
    """x + noise(B, 1, T) * linear(x), the noise keyed by position (keyed_noise.py):
    pointwise in time, so each new sample gets its noise once, as in a
    whole-sequence decode, and the same noise however the stream is stepped."""

    def __init__(self, module: NoiseBlock, index: int, steps_per_frame: int, mix_dtype: torch.dtype | None) -> None:
        self.linear = ChannelMix(module.linear.weight[..., 0], None, steps_per_frame, mix_dtype)
        self.index = index
        # This layer's time steps per frame, which place a stream's first output.
        self.steps_per_frame = steps_per_frame

    def step(self, x, st, ctx):
        steps = x.shape[-1]
        positions = ctx.noise_positions[:, self.index].copy()
        ctx.noise_positions[:, self.index] += steps
        if ctx.noise_mask is None:
            return x
        keys = keyed_noise.layer_keys(ctx.seeds, self.index)
        noise = torch.from_numpy(keyed_noise.gaussian(keys, positions, steps)).to(x.device, x.dtype)
        return x + (noise.unsqueeze(1) * ctx.noise_mask) * self.linear(x)


class _Conv(_StatefulLayer):
    """A 'same' conv (odd kernel, symmetric padding p). Stateless when p is 0.

    Depthwise convs run as conv1d (bit-exact at any shape, measured); others as one
    channel mix producing every tap's contribution, summed over the taps in a fixed
    order (conv1d's own 1x1 and dense paths are not bit-exact across shapes)."""

    def __init__(self, module: nn.Conv1d, steps_per_frame: int, mix_dtype: torch.dtype | None) -> None:
        (kernel,), (dilation,), (padding,), (stride,) = (
            module.kernel_size, module.dilation, module.padding, module.stride,
        )
        if stride != 1 or padding != (kernel - 1) * dilation // 2 or not kernel % 2:
            raise ValueError(f"not a 'same' convolution: {module}")
        self.depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if module.groups != 1 and not self.depthwise:
            raise ValueError(f"grouped convolution cannot be streamed bit-exactly: {module}")
        weight = module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()
        if self.depthwise:
            self.weight = weight
        else:
            # Rows ordered (tap, out channel): the product views as (B, tap, out, T).
            taps = weight.permute(2, 0, 1).reshape(-1, weight.shape[1])
            self.mix = ChannelMix(taps, self.bias if kernel == 1 else None, steps_per_frame, mix_dtype)
        self.kernel, self.dilation, self.groups, self.pad = kernel, dilation, module.groups, padding
        self.in_channels, self.out_channels = module.in_channels, module.out_channels

    def bind(self, first_slot):
        return super().bind(first_slot) if self.pad else first_slot

    def initial_state(self, device, dtype):
        if not self.pad:
            return []
        return [torch.zeros((1, self.in_channels, self.pad), device=device, dtype=dtype)]

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if self.depthwise:
            return F.conv1d(x, self.weight, self.bias, dilation=self.dilation, groups=self.groups)
        if self.kernel == 1:
            return self.mix(x)
        batch, _, length = x.shape
        steps = length - 2 * self.pad
        taps = self.mix(x).view(batch, self.kernel, self.out_channels, length)
        y = taps[:, 0, :, :steps]
        for tap in range(1, self.kernel):
            shift = tap * self.dilation
            y = y + taps[:, tap, :, shift : shift + steps]
        return y if self.bias is None else y + self.bias.view(-1, 1)

    def _run(self, buf: torch.Tensor, st: State) -> torch.Tensor | None:
        keep = 2 * self.pad
        st[self.slot] = buf[..., -keep:] if buf.shape[-1] > keep else buf
        return self._conv(buf) if buf.shape[-1] > keep else None

    def step(self, x, st, ctx):
        if not self.pad:
            return self._conv(x)
        return self._run(torch.cat((st[self.slot], x), dim=-1), st)

    def flush(self, st, ctx):
        if not self.pad:
            return None
        cache = st[self.slot]
        tail = cache.new_zeros((cache.shape[0], cache.shape[1], self.pad))
        return self._run(torch.cat((cache, tail), dim=-1), st)


class _TransposedConv(_StatefulLayer):
    """ConvTranspose1d(kernel 2s, stride s, padding s/2), s even, by overlap-add.

    Each input sample x[m] spreads over output blocks m (kernel taps 0..s-1) and
    m + 1 (taps s..2s-1); one matmul computes both halves for every new sample, and
    the second half of the newest sample is carried until the next call. torch's
    own transposed conv is no good here: on CPU it takes a slow path that costs
    ~50 ms for the first layer's 4 inputs, more than a whole-sequence decode of it.

    The carry (bias excluded) is empty until the first input: that marks the stream
    start, where the padding crops s/2 positions."""

    def __init__(self, module: nn.ConvTranspose1d, steps_per_frame: int, mix_dtype: torch.dtype | None) -> None:
        (kernel,), (stride,), (padding,), (out_pad,) = (
            module.kernel_size, module.stride, module.padding, module.output_padding,
        )
        if stride % 2 or kernel != 2 * stride or padding != stride // 2 or out_pad or module.groups != 1:
            raise ValueError(f"transposed conv shape not supported for streaming: {module}")
        weight = module.weight.detach()  # (in, out, 2s)
        # Rows ordered (out channel, tap), so that the product views as (B, out, 2s, n).
        self.mix = ChannelMix(
            weight.permute(1, 2, 0).reshape(-1, weight.shape[0]), None, steps_per_frame, mix_dtype
        )
        self.bias = module.bias.detach().view(1, -1, 1, 1)
        self.stride, self.crop = stride, padding
        self.out_channels = module.out_channels

    def initial_state(self, device, dtype):
        return [torch.zeros((1, self.out_channels, 0), device=device, dtype=dtype)]

    def step(self, x, st, ctx):
        s, (batch, _, n) = self.stride, x.shape
        taps = self.mix(x).view(batch, self.out_channels, 2 * s, n).transpose(2, 3)
        own, spill = taps[..., :s], taps[..., s:]  # (B, out, n, s): into blocks m and m + 1
        carry = st[self.slot]
        started = carry.shape[-1] > 0
        if not started:
            carry = spill.new_zeros((batch, self.out_channels, s))
        spilled_in = torch.cat((carry.unsqueeze(2), spill[:, :, :-1]), dim=2) if n > 1 else carry.unsqueeze(2)
        st[self.slot] = spill[:, :, -1]
        # Written out contiguous, since the sum would take the taps' strided layout.
        y = torch.add(own, spilled_in, out=own.new_empty((batch, self.out_channels, n, s)))
        y = y.add_(self.bias).view(batch, self.out_channels, n * s)
        return y if started else y[..., self.crop :]

    def flush(self, st, ctx):
        carry = st[self.slot]
        if not carry.shape[-1]:
            return None
        return carry[..., : self.crop] + self.bias[..., 0]


class _Chain(_Layer):
    def __init__(self, layers: Sequence[_Layer]) -> None:
        self.layers = list(layers)

    def initial_state(self, device, dtype):
        return [t for layer in self.layers for t in layer.initial_state(device, dtype)]

    def bind(self, first_slot):
        for layer in self.layers:
            first_slot = layer.bind(first_slot)
        return first_slot

    def step(self, x, st, ctx):
        for layer in self.layers:
            x = layer.step(x, st, ctx)
            if x is None:
                return None
        return x

    def flush(self, st, ctx):
        # Whatever an upstream layer flushes is new input for the layers below it.
        y = None
        for layer in self.layers:
            parts = []
            if y is not None:
                stepped = layer.step(y, st, ctx)
                if stepped is not None:
                    parts.append(stepped)
            tail = layer.flush(st, ctx)
            if tail is not None:
                parts.append(tail)
            y = None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y


class _Residual(_StatefulLayer):
    """x + branch(x), the skip path held back as long as the branch lags."""

    def __init__(self, branch: _Chain, channels: int) -> None:
        self.branch = branch
        self.channels = channels

    def initial_state(self, device, dtype):
        return [torch.zeros((1, self.channels, 0), device=device, dtype=dtype), *self.branch.initial_state(device, dtype)]

    def bind(self, first_slot):
        return self.branch.bind(super().bind(first_slot))

    def step(self, x, st, ctx):
        y = self.branch.step(x, st, ctx)
        skip = st[self.slot]
        held = torch.cat((skip, x), dim=-1) if skip.shape[-1] else x
        if y is None:
            st[self.slot] = held
            return None
        n = y.shape[-1]
        st[self.slot] = held[..., n:]
        return held[..., :n] + y

    def flush(self, st, ctx):
        y = self.branch.flush(st, ctx)
        return None if y is None else st[self.slot] + y


class _Builder:
    """Turns SNAC's decoder modules into streaming layers, numbering the noise layers
    and tracking each one's time steps per frame as the transposed convs upsample.
    Channel mixes compute in `mix_dtype` (None: the model's)."""

    def __init__(self, steps_per_frame: int, mix_dtype: torch.dtype | None = None) -> None:
        self.steps_per_frame = steps_per_frame
        self.mix_dtype = mix_dtype
        self.noise_layers: list[_Noise] = []

    def build(self, modules: nn.Sequential) -> _Chain:
        layers: list[_Layer] = []
        for module in modules:
            if isinstance(module, Snake1d):
                layers.append(_Snake(module))
            elif isinstance(module, nn.Conv1d):
                layers.append(_Conv(module, self.steps_per_frame, self.mix_dtype))
            elif isinstance(module, nn.ConvTranspose1d):
                layers.append(_TransposedConv(module, self.steps_per_frame, self.mix_dtype))
                self.steps_per_frame *= module.stride[0]
            elif isinstance(module, NoiseBlock):
                noise = _Noise(module, len(self.noise_layers), self.steps_per_frame, self.mix_dtype)
                self.noise_layers.append(noise)
                layers.append(noise)
            elif isinstance(module, DecoderBlock):
                layers.append(self.build(module.block))
            elif isinstance(module, ResidualUnit):
                channels = module.block[0].alpha.shape[1]
                layers.append(_Residual(self.build(module.block), channels))
            elif isinstance(module, nn.Tanh):
                layers.append(_Tanh())
            else:
                # LocalMHA (attn_window_size set) looks both ways over a window; the
                # 24 kHz model has none.
                raise ValueError(f"SNAC decoder layer {type(module).__name__} cannot be streamed")
        return _Chain(layers)


class _Quantizer:
    """SNAC's `from_codes` (embedding, 1x1 projection, repeat by stride, sum) with
    the projections as channel mixes, so that latents too are bit-exact however
    frames are batched."""

    def __init__(self, quantizer: nn.Module) -> None:
        self.layers = [
            (q.codebook.weight.detach(), ChannelMix(q.out_proj.weight[..., 0], q.out_proj.bias, 1), q.stride)
            for q in quantizer.quantizers
        ]

    def latents(self, codes: Sequence[torch.Tensor]) -> torch.Tensor:
        """codes[i] (B, n_i) -> latents (B, dim, T)."""
        total = None
        for layer_codes, (codebook, projection, stride) in zip(codes, self.layers):
            batch, n = layer_codes.shape
            rows = F.embedding(layer_codes.reshape(-1), codebook)
            z = mix_rows(rows, projection.weight, projection.bias)[:, : projection.out_channels]
            z = z.view(batch, n, -1).repeat_interleave(stride, dim=1)
            total = z if total is None else total + z
        return total.transpose(1, 2)


@dataclass
class StreamState:
    """One stream's decoder state and position."""

    first_frame_index: int = 0
    resume_from_sample: int = 0
    deterministic: bool = False
    seed: int = 0
    tensors: State = field(default_factory=list, repr=False)
    # Each noise layer's absolute position of its next output.
    noise_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    samples_out: int = 0
    flushed: bool = False

    def shape_key(self) -> tuple[int, ...]:
        """Streams with equal keys have caches of equal shapes and can share a forward."""
        return tuple(t.shape[-1] for t in self.tensors)


# Sample offsets (and noise positions, two counter words each) stay far inside int64.
MAX_FIRST_FRAME_INDEX = 2**61 // SAMPLES_PER_FRAME


def check_stream_start(first_frame_index: int, resume_from_sample: int, seed: int) -> None:
    """ValueError, saying which, unless a stream can start here."""
    if not 0 <= first_frame_index <= MAX_FIRST_FRAME_INDEX:
        raise ValueError(f"first_frame_index {first_frame_index} is outside 0..{MAX_FIRST_FRAME_INDEX}")
    if not 0 <= resume_from_sample <= MAX_FIRST_FRAME_INDEX * SAMPLES_PER_FRAME:
        raise ValueError(
            f"resume_from_sample {resume_from_sample} is outside 0..{MAX_FIRST_FRAME_INDEX * SAMPLES_PER_FRAME}"
        )
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside 0..2^64-1")


@dataclass(frozen=True)
class Chunk:
    """Decoded audio: float samples in [-1, 1] from absolute `sample_offset`."""

    sample_offset: int
    samples: np.ndarray


class StreamingSnacDecoder:
    """Streams SNAC codes to audio; one instance serves any number of streams.

    `precision` is "fp32" or "bf16" (precision.py; `precision.resolve` turns "auto"
    into one of them): each gives its own bits, exact however the decoder is driven.

    Not thread-safe: the engine drives it from one thread.
    """

    # The codec's facts, as the decode engine reads them from whichever decoder it drives.
    codes_per_frame = CODES_PER_FRAME
    codebook_size = CODEBOOK_SIZE
    sample_rate = SAMPLE_RATE
    frame_seconds = FRAME_SECONDS
    check_start = staticmethod(check_stream_start)  # ValueError unless a stream can start there

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            hint = " (precision.resolve picks one for 'auto')" if precision == "auto" else ""
            raise ValueError(f"decoder precision must be one of {', '.join(PRECISIONS)}, got {precision!r}{hint}")
        param = next(model.decoder.parameters())
        self.device, self.dtype = param.device, param.dtype
        if precision == "bf16" and self.dtype != torch.float32:
            raise ValueError(f"bf16 decoder precision needs a float32 model, not {self.dtype} (drop --half)")
        self.precision = precision
        self._quantizer = _Quantizer(model.quantizer)
        latent_steps, rest = divmod(SAMPLES_PER_FRAME, int(model.hop_length))
        if rest:
            raise ValueError(f"SNAC hop length {model.hop_length} does not divide a frame of {SAMPLES_PER_FRAME}")
        builder = _Builder(latent_steps, torch.bfloat16 if precision == "bf16" else None)
        self._net = builder.build(model.decoder.model)
        self._noise_steps_per_frame = np.array([n.steps_per_frame for n in builder.noise_layers], dtype=np.int64)
        self._n_slots = self._net.bind(0)
        # MKL's COMPATIBLE kernels split a GEMM across threads in a way that changes
        # bits (numeric_mode.py); the vendor kernels do not.
        self._one_gemm_thread = self.device.type == "cpu" and numeric_mode.current() == "mkl-compatible"
        # Streams in each forward of the last `decode` call, for stats and metrics.
        self.last_batch_sizes: list[int] = []

    @torch.inference_mode()
    def new_stream(
        self, first_frame_index: int = 0, resume_from_sample: int = 0, deterministic: bool = False, seed: int = 0
    ) -> StreamState:
        """A stream whose first frame is `first_frame_index`, decoded with zero left
        context (failover: the caller resends a few frames of context before the
        point it had relayed, and samples before `resume_from_sample` are dropped).
        Its noise is keyed by `seed` (0..2^64-1) and absolute position, so a resumed
        stream continues the noise of the one it replaces."""
        check_stream_start(first_frame_index, resume_from_sample, seed)
        tensors = self._net.initial_state(self.device, self.dtype)
        assert len(tensors) == self._n_slots
        positions = first_frame_index * self._noise_steps_per_frame
        return StreamState(first_frame_index, resume_from_sample, deterministic, seed, tensors, positions)

    @torch.inference_mode()
    def decode(
        self, items: Sequence[tuple[StreamState, np.ndarray]], max_batch: int = 64
    ) -> list[Chunk | None]:
        """Feeds each stream its new frames ((n, 7) codes) and returns the audio each
        can now complete, in order. Streams feeding the same number of frames with
        caches of the same shapes share one forward, up to `max_batch` at a time."""
        self._pin_gemm_threads()
        groups: dict[tuple, list[int]] = {}
        for i, (state, frames) in enumerate(items):
            if state.flushed:
                raise ValueError("stream already flushed")
            if len(frames) == 0:
                raise ValueError("a decode step needs at least one frame per stream")
            groups.setdefault((len(frames), state.shape_key()), []).append(i)
        results: list[Chunk | None] = [None] * len(items)
        self.last_batch_sizes = []
        for members in groups.values():
            for lo in range(0, len(members), max_batch):
                batch = members[lo : lo + max_batch]
                self.last_batch_sizes.append(len(batch))
                chunks = self._decode_group([items[i][0] for i in batch], [items[i][1] for i in batch])
                for i, chunk in zip(batch, chunks):
                    results[i] = chunk
        return results

    @torch.inference_mode()
    def flush(self, state: StreamState) -> Chunk | None:
        """Ends a stream: returns the rest of its audio, after which it takes no frames."""
        if state.flushed:
            raise ValueError("stream already flushed")
        state.flushed = True
        self._pin_gemm_threads()
        ctx = self._context([state])
        y = self._net.flush(state.tensors, ctx)
        state.tensors = []
        state.noise_positions = ctx.noise_positions[0]
        return self._emit(state, y[0, 0]) if y is not None else None

    def _pin_gemm_threads(self) -> None:
        if self._one_gemm_thread:
            numeric_mode.gemms_on_one_thread()

    def warm_up(self, frames: int = 4) -> None:
        """Runs a short stream, so that the first real one finds its kernels ready."""
        rng = np.random.default_rng(0)
        codes = rng.integers(0, CODEBOOK_SIZE, (frames, CODES_PER_FRAME))
        state = self.new_stream()
        for i in range(frames):
            self.decode([(state, codes[i : i + 1])])
        self.flush(state)

    def _context(self, states: Sequence[StreamState]) -> _StepContext:
        seeds = np.array([s.seed for s in states], dtype=np.uint64)
        positions = np.stack([s.noise_positions for s in states])
        wants = [not s.deterministic for s in states]
        if not any(wants):
            return _StepContext(None, seeds, positions)
        mask = torch.tensor(wants, device=self.device, dtype=self.dtype).view(-1, 1, 1)
        return _StepContext(mask, seeds, positions)

    def _decode_group(self, states: Sequence[StreamState], frames: Sequence[np.ndarray]) -> list[Chunk | None]:
        layers = frames_to_layers(np.stack(frames))
        codes = [
            torch.from_numpy(layer.reshape(len(states), -1)).to(self.device) for layer in layers
        ]
        latent = self._quantizer.latents(codes).to(self.dtype)
        ctx = self._context(states)
        if len(states) == 1:
            st = states[0].tensors
        else:
            st = [torch.cat(parts, dim=0) for parts in zip(*(s.tensors for s in states))]
        y = self._net.step(latent, st, ctx)
        for b, state in enumerate(states):
            state.noise_positions = ctx.noise_positions[b]
            if len(states) > 1:
                state.tensors = [t[b : b + 1] for t in st]
        if y is None:
            return [None] * len(states)
        return [self._emit(state, y[b, 0]) for b, state in enumerate(states)]

    def _emit(self, state: StreamState, samples: torch.Tensor) -> Chunk | None:
        offset = state.first_frame_index * SAMPLES_PER_FRAME + state.samples_out
        state.samples_out += samples.shape[-1]
        skip = max(0, min(state.resume_from_sample - offset, samples.shape[-1]))
        if skip == samples.shape[-1]:
            return None
        return Chunk(offset + skip, samples[skip:].float().cpu().numpy())
