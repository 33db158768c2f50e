"""`chorus say` and `chorus voices`: a plain gRPC client of the gateway.

`say` writes audio as it arrives (a file or stdout, so `chorus say ... -o - | aplay`
starts playing at once) and reports the time to first audio twice: as the client
saw it and as the gateway measured it, since the difference is the transport.
It reads the format table, not the encoders, so it loads no FFmpeg.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from chorus.serving import GRPC_OPTIONS
from chorus.audio_formats import FORMATS, NATIVE_RATE, for_extension

DEFAULT_GATEWAY = "127.0.0.1:50051"


@dataclass
class SpeechResult:
    summary: common_pb2.SynthesisSummary
    # Seconds from sending the request to the first audio bytes, measured here.
    first_audio_s: float | None
    bytes_written: int
    samples: int


def gateway_address(explicit: str | None = None) -> str:
    return explicit or os.environ.get("CHORUS_GATEWAY") or DEFAULT_GATEWAY


def say(
    address: str,
    text: str,
    out: BinaryIO,
    *,
    voice: str = "",
    encoding: str = "wav",
    sample_rate: int = 0,
    timeout: float | None = None,
    sampling: common_pb2.SamplingParams | None = None,
    request_id: str = "",
    on_progress: Callable[[int, float], None] | None = None,
) -> SpeechResult:
    """Synthesizes `text` through the gateway at `address`, writing audio to `out` as it comes.

    `on_progress(samples_so_far, elapsed_s)` runs after each chunk. Raises grpc.RpcError.
    """
    request = gateway_pb2.SynthesizeRequest(
        text=text,
        voice=voice,
        audio=gateway_pb2.AudioConfig(encoding=FORMATS[encoding].wire, sample_rate_hz=sample_rate),
        request_id=request_id,
    )
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    started = time.perf_counter()
    first_audio_s, written, samples, summary = None, 0, 0, None
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
        for response in stub.Synthesize(request, timeout=timeout):
            if response.WhichOneof("payload") == "summary":
                summary = response.summary
                continue
            if first_audio_s is None and response.audio.data:
                first_audio_s = time.perf_counter() - started
            out.write(response.audio.data)
            out.flush()
            written += len(response.audio.data)
            samples += response.audio.num_samples
            if on_progress:
                on_progress(samples, time.perf_counter() - started)
    if summary is None:
        raise RuntimeError("the gateway ended the stream without a summary")
    return SpeechResult(summary, first_audio_s, written, samples)


def open_output(path: str | Path) -> BinaryIO:
    """Opens an audio file for writing, creating its folder (`-o out/hello.wav` just works)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")


def describe(result: SpeechResult) -> str:
    """The summary, for people."""
    s = result.summary
    client_ttfa = f"{result.first_audio_s * 1000:.0f} ms" if result.first_audio_s is not None else "n/a"
    return "\n".join(
        [
            f"time to first audio: {client_ttfa} here, {s.time_to_first_audio_ms:.0f} ms at the gateway "
            f"(first token {s.time_to_first_token_ms:.0f} ms)",
            f"audio: {s.audio_seconds:.2f} s, real-time factor {s.real_time_factor:.2f}, "
            f"{s.tokens} tokens / {s.frames} frames, finish: {s.finish_reason or 'n/a'}",
            f"request id: {s.request_id}" + (f", trace id: {s.trace_id}" if s.trace_id else ""),
        ]
    )


def register_say(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description="Synthesize text through a Chorus gateway.")
    p.add_argument("text", help='text to speak; "-" reads it from stdin')
    p.add_argument("-o", "--output", required=True, help='output file; "-" writes to stdout')
    p.add_argument("--gateway", default=None, help=f"gateway host:port [CHORUS_GATEWAY, default {DEFAULT_GATEWAY}]")
    p.add_argument("--voice", default="", help="voice name (see `chorus voices`); default: the gateway's")
    p.add_argument("--encoding", choices=sorted(FORMATS), default=None,
                   help="audio format; default: from the output file's extension, else wav")
    p.add_argument("--sample-rate", type=int, default=0, help="output rate in Hz; 0 keeps the model's 24000")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable audio")
    p.set_defaults(func=run_say)


def run_say(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    to_stdout = args.output == "-"
    fmt = args.encoding or (None if to_stdout else getattr(for_extension(args.output), "name", None)) or "wav"
    sampling = common_pb2.SamplingParams(seed=args.seed) if args.seed is not None else None
    address = gateway_address(args.gateway)
    progress = _progress_printer(args.sample_rate or NATIVE_RATE)
    out = sys.stdout.buffer if to_stdout else open_output(args.output)
    try:
        result = say(address, text, out, voice=args.voice, encoding=fmt, sample_rate=args.sample_rate,
                     timeout=args.timeout, sampling=sampling, on_progress=progress)
    except grpc.RpcError as err:
        _fail_cleanup(out, None if to_stdout else args.output)
        print(f"\nchorus say: {_explain(err, address)}", file=sys.stderr)
        return 1
    except BaseException:
        _fail_cleanup(out, None if to_stdout else args.output)
        raise
    if not to_stdout:
        out.close()
    print(file=sys.stderr)
    if not to_stdout:
        print(f"wrote {args.output} ({fmt}, {result.bytes_written} bytes)", file=sys.stderr)
    print(describe(result), file=sys.stderr)
    return 0


def register_voices(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description="List the voices a Chorus gateway speaks.")
    p.add_argument("--gateway", default=None, help=f"gateway host:port [CHORUS_GATEWAY, default {DEFAULT_GATEWAY}]")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=run_voices)


def run_voices(args: argparse.Namespace) -> int:
    address = gateway_address(args.gateway)
    try:
        with grpc.insecure_channel(address) as channel:
            reply = gateway_pb2_grpc.SynthesisServiceStub(channel).ListVoices(
                gateway_pb2.ListVoicesRequest(), timeout=args.timeout
            )
    except grpc.RpcError as err:
        print(f"chorus voices: {_explain(err, address)}", file=sys.stderr)
        return 1
    for i, voice in enumerate(reply.voices):
        marker = " (default)" if i == 0 else ""
        print(f"{voice.name:<10} {voice.description}{marker}")
    return 0


def _progress_printer(sample_rate: int) -> Callable[[int, float], None]:
    """A one-line progress report on stderr, redrawn in place on a terminal."""
    interactive = sys.stderr.isatty()
    last = [0.0]

    def report(samples: int, elapsed: float) -> None:
        if not interactive and elapsed - last[0] < 1.0:
            return
        last[0] = elapsed
        end = "\r" if interactive else "\n"
        line = f"received {samples / sample_rate:.2f} s of audio in {elapsed:.2f} s"
        print(line, end=end, file=sys.stderr, flush=True)

    return report


def _fail_cleanup(out: BinaryIO, path: str | None) -> None:
    """A failed synthesis leaves no half-written file behind."""
    if path is not None:
        out.close()
        Path(path).unlink(missing_ok=True)


def _explain(err: grpc.RpcError, address: str) -> str:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    message = f"{code.name if code else 'error'}: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        message += f"\n  is a gateway running at {address}? `chorus serve` starts one on the demo models"
    return message
