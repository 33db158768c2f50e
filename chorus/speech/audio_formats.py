"""The output formats the gateway speaks, as plain data.

One table serves the encoder (which muxer and codec), the validator (which rates an
encoding accepts) and the `chorus say` client (which name or file extension picks
which wire enum), so the three cannot disagree. It imports no codec library, so a
client can read it without loading FFmpeg.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from chorus.proto.tts.v1 import gateway_pb2
from chorus.speech import orpheus

# Telephony, wideband, the CD family and the model's own rate.
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
# Opus runs at 48 kHz internally and FFmpeg's libopus only takes the rates that
# divide it; resampling 44.1 kHz behind the caller's back would hand them a stream
# that decodes at a rate they did not ask for.
OPUS_RATES = (8000, 16000, 24000, 48000)


@dataclass(frozen=True)
class AudioFormat:
    name: str
    wire: int  # gateway_pb2.AudioEncoding value
    muxer: str  # FFmpeg output format
    codec: str  # FFmpeg encoder
    extensions: tuple[str, ...]
    # HTTP Content-Type of the stream (the OpenAI endpoint and the browser page).
    content_type: str = "application/octet-stream"
    rates: tuple[int, ...] = SAMPLE_RATES
    # FFmpeg muxer options beyond the packet flushing that every format gets.
    muxer_options: dict[str, str] = field(default_factory=dict)


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("pcm", gateway_pb2.AUDIO_ENCODING_PCM_S16LE, "s16le", "pcm_s16le", (".pcm", ".raw", ".s16"),
                    "audio/pcm"),
        # FFmpeg's WAV muxer on a non-seekable sink writes the header first with the
        # RIFF and data sizes set to 0xFFFFFFFF ("unknown, read to the end"), which
        # is what a streamed WAV needs; readers take the length from the bytes. A
        # client writing to a file patches the sizes at the end (tools/client.py).
        AudioFormat("wav", gateway_pb2.AUDIO_ENCODING_WAV, "wav", "pcm_s16le", (".wav",), "audio/wav"),
        # The Ogg muxer buffers a page per second by default; one page per 20 ms Opus
        # packet keeps the first audio from waiting a second.
        AudioFormat(
            "opus", gateway_pb2.AUDIO_ENCODING_OGG_OPUS, "ogg", "libopus", (".ogg", ".opus"), "audio/ogg",
            rates=OPUS_RATES, muxer_options={"page_duration": "20000"},
        ),
        AudioFormat("mp3", gateway_pb2.AUDIO_ENCODING_MP3, "mp3", "libmp3lame", (".mp3",), "audio/mpeg"),
        AudioFormat("mulaw", gateway_pb2.AUDIO_ENCODING_MULAW, "mulaw", "pcm_mulaw", (".ulaw", ".mulaw", ".mu"),
                    "audio/basic"),
        AudioFormat("alaw", gateway_pb2.AUDIO_ENCODING_ALAW, "alaw", "pcm_alaw", (".alaw", ".al"), "audio/x-alaw-basic"),
        # Streamed FLAC: the STREAMINFO block cannot be patched afterwards, so it says
        # "total samples unknown", which every decoder accepts.
        AudioFormat("flac", gateway_pb2.AUDIO_ENCODING_FLAC, "flac", "flac", (".flac",), "audio/flac"),
        # AAC in ADTS framing: each frame carries its own header, so it streams. An
        # .m4a (MP4) file needs its index written after the audio: not a streaming format.
        AudioFormat("aac", gateway_pb2.AUDIO_ENCODING_AAC, "adts", "aac", (".aac", ".adts"), "audio/aac"),
    )
}

BY_WIRE: dict[int, AudioFormat] = {f.wire: f for f in FORMATS.values()}
# The proto says an unset encoding means raw PCM.
BY_WIRE[gateway_pb2.AUDIO_ENCODING_UNSPECIFIED] = FORMATS["pcm"]

NATIVE_RATE = orpheus.SAMPLE_RATE


def for_extension(path: str) -> AudioFormat | None:
    """The format a file name asks for by its extension, if any."""
    lowered = path.lower()
    for fmt in FORMATS.values():
        if lowered.endswith(fmt.extensions):
            return fmt
    return None


def known_extensions() -> str:
    """Every format with its extensions, for error messages: "wav (.wav), aac (.aac, .adts), ..."."""
    return ", ".join(f"{f.name} ({', '.join(f.extensions)})" for f in FORMATS.values())


def write_stream_lengths(buf, fmt: AudioFormat, samples: int) -> bool:
    """Writes the real length into a finished stream's WAV or FLAC header, in place
    in `buf` (a bytearray, or an mmap of a file); True if it did.

    A streaming muxer cannot seek back, so it leaves the length "unknown": WAV's RIFF
    and data sizes at 0xFFFFFFFF (Python's `wave` then reads 2**31-1 frames) and
    FLAC's STREAMINFO total at 0 (libsndfile then tries an array too big to allocate).
    The gateway fixes a file it sends whole, and `chorus say` the file it wrote, with
    this one function. Anything it cannot read as such a header is left as it is, and
    so is a WAV over 4 GiB, whose sizes cannot be written in 32 bits."""
    if fmt.name == "wav":
        return _wav_sizes(buf)
    if fmt.name == "flac":
        return _flac_total(buf, samples)
    return False


def _wav_sizes(buf) -> bool:
    size = len(buf)
    if size - 8 > 0xFFFFFFFF or bytes(buf[:4]) != b"RIFF" or bytes(buf[8:12]) != b"WAVE":
        return False
    position = 12
    # Chunks are walked, not assumed: FFmpeg puts a LIST chunk before the data.
    while position + 8 <= size:
        chunk_id, chunk_size = struct.unpack_from("<4sI", buf, position)
        if chunk_id == b"data":
            struct.pack_into("<I", buf, position + 4, size - position - 8)
            struct.pack_into("<I", buf, 4, size - 8)
            return True
        position += 8 + chunk_size + (chunk_size & 1)
    return False


def _flac_total(buf, samples: int) -> bool:
    # The first metadata block (type 0, STREAMINFO) starts at byte 8; bytes 18..25 of
    # the file hold rate (20 bits), channels (3), bits per sample (5) and total
    # samples (36), big-endian.
    if len(buf) < 26 or bytes(buf[:4]) != b"fLaC" or buf[4] & 0x7F != 0 or not 0 <= samples < 1 << 36:
        return False
    packed = int.from_bytes(bytes(buf[18:26]), "big")
    buf[18:26] = ((packed & ~((1 << 36) - 1)) | samples).to_bytes(8, "big")
    return True
