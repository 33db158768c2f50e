"""`chorus say` and `chorus voices`: a plain gRPC client of the gateway.

`say` writes audio as it arrives (a file or stdout, so `chorus say ... -o - | aplay`
starts playing at once) and reports the time to first audio twice: as the client
saw it and as the gateway measured it, since the difference is the transport.
It reads the format table, not the encoders, so it loads no FFmpeg.

A file's extension picks its format, and a name that says one format never gets
another's bytes. A stream cannot know its length up front, so WAV and FLAC come with
"length unknown" headers; when the output is a regular file, the header is patched
with the real length at the end, so every reader sees the right duration.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from chorus.proto.tts.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from chorus.rpc.serving import GRPC_OPTIONS
from chorus.speech.audio_formats import (
    FORMATS, NATIVE_RATE, AudioFormat, for_extension, known_extensions, write_stream_lengths,
)

DEFAULT_GATEWAY = "127.0.0.1:50051"


@dataclass
class SpeechResult:
    summary: common_pb2.SynthesisSummary
    # Seconds from sending the request to the first audio bytes, measured here.
    first_audio_s: float | None
    bytes_written: int
    samples: int


class OutputError(ValueError):
    """An output name and format that do not go together."""


def output_format(output: str, encoding: str | None) -> AudioFormat:
    """The format to ask for, given the output ("-" is stdout) and an explicit --encoding."""
    if output == "-" or not Path(output).suffix:
        return FORMATS[encoding or "wav"]
    by_name = for_extension(output)
    if by_name is None:
        raise OutputError(
            f"{output}: {Path(output).suffix!r} is not an audio format the gateway streams; "
            f"use one of: {known_extensions()}"
        )
    if encoding is not None and encoding != by_name.name:
        raise OutputError(
            f"{output} names {by_name.name} but --encoding is {encoding}: the extension must match the bytes "
            f"(use {FORMATS[encoding].extensions[0]}, or drop --encoding)"
        )
    return by_name


def patch_stream_header(path: str | Path, fmt: AudioFormat, samples: int) -> bool:
    """Writes the real length into a streamed WAV or FLAC file's header; True if it did."""
    if fmt.name not in ("wav", "flac") or not Path(path).is_file() or Path(path).stat().st_size == 0:
        return False
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as view:
        return write_stream_lengths(view, fmt, samples)


def gateway_address(explicit: str | None = None) -> str:
    return explicit or os.environ.get("CHORUS_GATEWAY") or DEFAULT_GATEWAY


@dataclass(frozen=True)
class GatewayAccess:
    """How to reach a secured gateway: TLS against `tls_ca` (checking the certificate
    for `tls_server_name` instead of the address, e.g. through a port-forward) and an
    API key. The defaults reach the local demo's plaintext gateway."""

    tls_ca: str | None = None
    api_key: str | None = None
    tls_server_name: str | None = None

    def channel(self, address: str) -> grpc.Channel:
        if not self.tls_ca:
            return grpc.insecure_channel(address, options=GRPC_OPTIONS)
        options = list(GRPC_OPTIONS)
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(self.tls_ca).read_bytes())
        return grpc.secure_channel(address, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def add_access_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--tls-ca", default=env("CHORUS_TLS_CA"),
                        help="PEM CA bundle: talk TLS to the gateway and verify it against this [CHORUS_TLS_CA]")
    parser.add_argument("--tls-server-name", default=env("CHORUS_TLS_SERVER_NAME"),
                        help="name the gateway's certificate must carry, when it is not the address "
                             "[CHORUS_TLS_SERVER_NAME]")
    parser.add_argument("--api-key", default=env("CHORUS_API_KEY"),
                        help="API key for a gateway that needs one; prefer the environment variable, which "
                             "other users cannot see in the process list [CHORUS_API_KEY]")


def access_from(args: argparse.Namespace) -> GatewayAccess:
    return GatewayAccess(tls_ca=args.tls_ca, api_key=args.api_key, tls_server_name=args.tls_server_name)


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
    access: GatewayAccess = GatewayAccess(),
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
    with access.channel(address) as channel, ConnectionWatch(channel):
        stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
        for response in stub.Synthesize(request, timeout=timeout, metadata=access.metadata()):
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


class ConnectionWatch:
    """Whether a channel ever connected, so an error can say if the gateway was reached.

    An UNAVAILABLE status means "no gateway there" only when the connection itself
    failed; a gateway that answered UNAVAILABLE (no token server) is running. An
    RpcError raised inside the block carries `connected` as an attribute.

    State changes arrive on gRPC's own thread and may lag the error, so an
    UNAVAILABLE with no READY seen yet gets one short connection probe."""

    PROBE_S = 2.0

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self.connected = False

    def _seen(self, state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            self.connected = True

    def __enter__(self) -> ConnectionWatch:
        self._channel.subscribe(self._seen, try_to_connect=False)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._channel.unsubscribe(self._seen)
        if not isinstance(exc, grpc.RpcError):
            return
        if not self.connected and exc.code() == grpc.StatusCode.UNAVAILABLE:
            try:
                grpc.channel_ready_future(self._channel).result(timeout=self.PROBE_S)
                self.connected = True
            except grpc.FutureTimeoutError:
                pass
        exc.connected = self.connected


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
    p.add_argument("-o", "--output", default=None,
                   help='output file, its extension picks the format; "-" writes to stdout (default: out.wav, '
                        "or out.<ext> of --encoding)")
    p.add_argument("--gateway", default=None, help=f"gateway host:port [CHORUS_GATEWAY, default {DEFAULT_GATEWAY}]")
    p.add_argument("--voice", default="", help="voice name (see `chorus voices`); default: the gateway's")
    p.add_argument("--encoding", choices=sorted(FORMATS), default=None,
                   help="audio format; default: from the output file's extension, else wav. It must match the extension")
    p.add_argument("--sample-rate", type=int, default=0, help="output rate in Hz; 0 keeps the model's 24000")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable audio")
    add_access_flags(p)
    p.set_defaults(func=run_say)


def run_say(args: argparse.Namespace) -> int:
    if args.output is None:
        args.output = "out" + FORMATS[args.encoding or "wav"].extensions[0]
    try:
        fmt = output_format(args.output, args.encoding).name
    except OutputError as err:
        print(f"chorus say: {err}", file=sys.stderr)
        return 2
    text = sys.stdin.read() if args.text == "-" else args.text
    to_stdout = args.output == "-"
    sampling = common_pb2.SamplingParams(seed=args.seed) if args.seed is not None else None
    address = gateway_address(args.gateway)
    progress = _progress_printer(args.sample_rate or NATIVE_RATE)
    out = sys.stdout.buffer if to_stdout else open_output(args.output)
    try:
        result = say(address, text, out, voice=args.voice, encoding=fmt, sample_rate=args.sample_rate,
                     timeout=args.timeout, sampling=sampling, on_progress=progress, access=access_from(args))
    except grpc.RpcError as err:
        _fail_cleanup(out, None if to_stdout else args.output)
        print(f"\nchorus say: {_explain(err, address)}", file=sys.stderr)
        return 1
    except BaseException:
        _fail_cleanup(out, None if to_stdout else args.output)
        raise
    if not to_stdout:
        out.close()
        patch_stream_header(args.output, FORMATS[fmt], result.samples)
    print(file=sys.stderr)
    if not to_stdout:
        print(f"wrote {args.output} ({fmt}, {result.bytes_written} bytes)", file=sys.stderr)
    print(describe(result), file=sys.stderr)
    return 0


def register_voices(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(
        name, help=help_text,
        description="List the voices a Chorus gateway speaks, clone one from a recording, or delete one.")
    p.add_argument("--gateway", default=None, help=f"gateway host:port [CHORUS_GATEWAY, default {DEFAULT_GATEWAY}]")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--add", metavar="NAME", default=None,
                   help="clone a voice named NAME from --audio and --transcript (the gateway needs --voice-store)")
    p.add_argument("--audio", type=Path, default=None, help="with --add: the recording (WAV, FLAC, MP3, Ogg; 1-30 s)")
    p.add_argument("--transcript", default=None, help="with --add: the words spoken in the recording")
    p.add_argument("--family", default="", help="with --add: the model family to speak it (default: neutts-air)")
    p.add_argument("--delete", metavar="NAME", default=None, help="delete the registered voice NAME")
    add_access_flags(p)
    p.set_defaults(func=run_voices)


def run_voices(args: argparse.Namespace) -> int:
    address = gateway_address(args.gateway)
    if args.add is not None and (args.audio is None or args.transcript is None):
        print("chorus voices: --add needs --audio FILE and --transcript TEXT", file=sys.stderr)
        return 2
    try:
        access = access_from(args)
        audio = args.audio.read_bytes() if args.add is not None else b""
        with access.channel(address) as channel, ConnectionWatch(channel):
            stub = gateway_pb2_grpc.SynthesisServiceStub(channel)
            if args.add is not None:
                # Encoding a reference takes longer than listing: at least a minute's deadline.
                added = stub.RegisterVoice(gateway_pb2.RegisterVoiceRequest(
                    name=args.add, audio=audio, transcript=args.transcript, family=args.family),
                    timeout=max(args.timeout, 60.0), metadata=access.metadata())
                print(f"registered {added.voice.name}: {added.voice.description}, "
                      f"{added.reference_seconds:.2f} s of reference in {added.reference_frames} frames")
                return 0
            if args.delete is not None:
                stub.DeleteVoice(gateway_pb2.DeleteVoiceRequest(name=args.delete), timeout=args.timeout,
                                 metadata=access.metadata())
                print(f"deleted {args.delete}")
                return 0
            reply = stub.ListVoices(gateway_pb2.ListVoicesRequest(), timeout=args.timeout, metadata=access.metadata())
    except OSError as err:
        print(f"chorus voices: cannot read {args.audio}: {err.strerror or err}", file=sys.stderr)
        return 2
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
    if code == grpc.StatusCode.UNAVAILABLE and not getattr(err, "connected", False):
        message += f"\n  is a gateway running at {address}? `chorus serve` starts one on the demo models"
        message += "\n  (a gateway with TLS needs --tls-ca; one without refuses it)"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        message += "\n  set the gateway's API key with CHORUS_API_KEY (or --api-key)"
    return message
