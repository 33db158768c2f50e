"""Codec worker configuration: typed, validated once, set from flags/env only in __main__
(the flags every service shares, drain time included, live in chorus.rpc.entrypoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from chorus.realtime.capacity import ADMISSION_MARGIN
from chorus.realtime.cpu_budget import cpu_budget
from chorus.security.tls import DEFAULT_ALLOWED_CLIENTS, TlsFiles
from chorus.speech import codecs
from chorus.telemetry.tiers import CODEC_WORKER
from services.codec_worker.numeric_mode import DEFAULT as NUMERIC_MODE_DEFAULT
from services.codec_worker.numeric_mode import MODES as NUMERIC_MODES
from services.codec_worker.precision import CHOICES as DECODER_PRECISIONS
from services.codec_worker.precision import DEFAULT as DECODER_PRECISION_DEFAULT

DEVICES = ("auto", "cpu", "cuda")
# A short wait for more streams to share a forward: on 2 CPU cores 5 ms raised
# throughput ~10% at 4-8 streams (decode_engine.py), for at most 5 ms on a ~30 ms step. A
# GPU step is a few ms, so its wait is shorter (the usual practice; no GPU was at
# hand to measure it).
GPU_BATCH_WAIT_MS = 2.0
CPU_BATCH_WAIT_MS = 5.0


# The headroom N* is defined with (chorus.realtime.capacity.ADMISSION_MARGIN): a worker that
# kept 30% back admitted N*-1 streams wherever the decoder's headroom at N* was 15-30%.
CODEC_CAPACITY_MARGIN = ADMISSION_MARGIN
SERVED_CODECS = (codecs.SNAC_24KHZ, codecs.NEUCODEC_24KHZ)


@dataclass(frozen=True)
class CodecWorkerConfig:
    model_dir: Path
    device: str = "auto"
    # Float16 weights and activations; CUDA only.
    half: bool = False
    max_streams: int = 64
    # Most streams decoded in one forward.
    max_batch: int = 16
    # Longest a step waits for more streams to have frames ready; None picks by device.
    batch_wait_ms: float | None = None
    host: str = "127.0.0.1"
    # torch intra-op threads of the decode thread; default: the CPUs this process may
    # use (affinity and cgroup quota). `chorus serve` passes a share instead.
    torch_threads: int = field(default_factory=lambda: cpu_budget().threads)
    # Real-time capacity keeps this fraction of spare speed per stream. Wider than the
    # token server's: a decode step is long (tens of ms) against a listener's 150 ms
    # start buffer, so one slow step beside a busy backbone is an audible late sample.
    capacity_margin: float = CODEC_CAPACITY_MARGIN
    # Measure step times at start, so that capacity is known before the first stream.
    calibrate: bool = True
    # Most streams one client (a token server: certificate identity at its address,
    # or its address) may hold, so that no one client can take the whole cap; None
    # is half of max_streams, 0 no limit.
    max_streams_per_client: int | None = None
    # A stream that sends no DecodeStart this long after opening, or later neither
    # sends nor reads this long before it finishes, is ended (DEADLINE_EXCEEDED).
    start_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    # PEM files for TLS; with them the worker requires a client certificate naming
    # one of allowed_clients.
    tls: TlsFiles | None = None
    allowed_clients: tuple[str, ...] = DEFAULT_ALLOWED_CLIENTS[CODEC_WORKER]
    # MKL's kernels on CPU (numeric_mode.py): "vendor" (fast; same bits within a CPU
    # vendor) or "compatible" (same bits on every x86 CPU, 1.65-3x the decode time).
    numeric_mode: str = NUMERIC_MODE_DEFAULT
    # The decoder's channel mixes in float32 or bfloat16 (precision.py); "auto" is
    # bf16 where the CPU has native bf16 (or CUDA takes it), else fp32. Each gives its
    # own bits, and the worker's reported numeric mode says which.
    decoder_precision: str = DECODER_PRECISION_DEFAULT
    # What model_dir holds, by its wire name (chorus.speech.codecs): SNAC for Orpheus,
    # NeuCodec for NeuTTS-Air. A worker decodes one; a pool per codec scales apart.
    codec: str = codecs.SNAC_24KHZ

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        problems = []
        if self.numeric_mode not in NUMERIC_MODES:
            problems.append(f"numeric_mode must be one of {', '.join(NUMERIC_MODES)}, got {self.numeric_mode!r}")
        if self.codec not in SERVED_CODECS:
            problems.append(f"codec must be one of {', '.join(SERVED_CODECS)}, got {self.codec[:70]!r}")
        elif self.codec == codecs.NEUCODEC_24KHZ and (self.half or self.device == "cuda"):
            problems.append("the NeuCodec decoder runs in float32 on the CPU for now: drop half and device cuda")
        if self.decoder_precision not in DECODER_PRECISIONS:
            problems.append(f"decoder_precision must be one of {', '.join(DECODER_PRECISIONS)}, "
                            f"got {self.decoder_precision!r}")
        elif self.half and self.decoder_precision == "bf16":
            problems.append("decoder_precision bf16 needs a float32 model: drop half, or use auto or fp32")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.half and self.device == "cpu":
            problems.append("half precision needs CUDA (device 'cuda' or 'auto')")
        if not 1 <= self.max_streams <= 4096:
            problems.append(f"max_streams must be 1..4096, got {self.max_streams}")
        if not 1 <= self.max_batch <= 256:
            problems.append(f"max_batch must be 1..256, got {self.max_batch}")
        if self.batch_wait_ms is not None and not 0 <= self.batch_wait_ms <= 1000:
            problems.append(f"batch_wait_ms must be 0..1000, got {self.batch_wait_ms}")
        if not self.host:
            problems.append("host must not be empty")
        if not 1 <= self.torch_threads <= 1024:
            problems.append(f"torch_threads must be 1..1024, got {self.torch_threads}")
        if not 0.0 <= self.capacity_margin <= 10.0:
            problems.append(f"capacity_margin must be in [0, 10], got {self.capacity_margin}")
        if self.max_streams_per_client is None:
            object.__setattr__(self, "max_streams_per_client", max(1, self.max_streams // 2))
        elif not 0 <= self.max_streams_per_client <= self.max_streams:
            problems.append(f"max_streams_per_client must be 0..max_streams ({self.max_streams}), "
                            f"got {self.max_streams_per_client}")
        for name in ("start_timeout_s", "idle_timeout_s"):
            if not 0 < getattr(self, name) <= 3600:
                problems.append(f"{name} must be in (0, 3600] seconds, got {getattr(self, name)}")
        object.__setattr__(self, "allowed_clients", tuple(self.allowed_clients))
        if self.tls is not None and not self.allowed_clients:
            problems.append("with TLS, allowed_clients must name who may call (e.g. chorus-token-server)")
        if problems:
            raise ValueError("invalid codec worker config: " + "; ".join(problems))

    def batch_wait_for(self, device_type: str) -> float:
        if self.batch_wait_ms is not None:
            return self.batch_wait_ms
        return GPU_BATCH_WAIT_MS if device_type == "cuda" else CPU_BATCH_WAIT_MS
