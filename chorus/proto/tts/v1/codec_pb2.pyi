from chorus.proto.tts.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "audio", "codec")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    audio: _common_pb2.ReferenceAudio
    codec: str
    def __init__(self, request_id: _Optional[str] = ..., audio: _Optional[_Union[_common_pb2.ReferenceAudio, _Mapping]] = ..., codec: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("codes",)
    CODES_FIELD_NUMBER: _ClassVar[int]
    codes: _common_pb2.ReferenceCodes
    def __init__(self, codes: _Optional[_Union[_common_pb2.ReferenceCodes, _Mapping]] = ...) -> None: ...

class DecodeStart(_message.Message):
    __slots__ = ("request_id", "first_frame_index", "resume_from_sample", "deterministic", "seed", "playback", "codec")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PLAYBACK_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_frame_index: int
    resume_from_sample: int
    deterministic: bool
    seed: int
    playback: _common_pb2.PlaybackClock
    codec: str
    def __init__(self, request_id: _Optional[str] = ..., first_frame_index: _Optional[int] = ..., resume_from_sample: _Optional[int] = ..., deterministic: _Optional[bool] = ..., seed: _Optional[int] = ..., playback: _Optional[_Union[_common_pb2.PlaybackClock, _Mapping]] = ..., codec: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("start", "frames")
    START_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    start: DecodeStart
    frames: _common_pb2.CodeFrames
    def __init__(self, start: _Optional[_Union[DecodeStart, _Mapping]] = ..., frames: _Optional[_Union[_common_pb2.CodeFrames, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("audio", "final")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    audio: _common_pb2.PcmChunk
    final: bool
    def __init__(self, audio: _Optional[_Union[_common_pb2.PcmChunk, _Mapping]] = ..., final: _Optional[bool] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLoadResponse(_message.Message):
    __slots__ = ("open_streams", "max_streams", "device", "decode_rate", "busy_ratio", "lag_seconds", "capacity_streams", "numeric_mode", "codecs")
    OPEN_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DECODE_RATE_FIELD_NUMBER: _ClassVar[int]
    BUSY_RATIO_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_STREAMS_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_MODE_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    open_streams: int
    max_streams: int
    device: str
    decode_rate: float
    busy_ratio: float
    lag_seconds: float
    capacity_streams: int
    numeric_mode: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, open_streams: _Optional[int] = ..., max_streams: _Optional[int] = ..., device: _Optional[str] = ..., decode_rate: _Optional[float] = ..., busy_ratio: _Optional[float] = ..., lag_seconds: _Optional[float] = ..., capacity_streams: _Optional[int] = ..., numeric_mode: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ...) -> None: ...
