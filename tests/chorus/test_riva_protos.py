"""protos/riva restates Riva's TTS API: its wire shape (package, messages, field numbers
and types, enum values, methods and their streaming) must equal what the pinned
`nvidia-riva-client` was generated from. Each side is described in its own process:
the two sets of generated modules cannot share one protobuf descriptor pool."""

from __future__ import annotations

import json
import subprocess
import sys

DESCRIBE = r"""
import json, sys
from google.protobuf import descriptor_pb2
modules = {
    "chorus": ["chorus.proto.riva.riva_tts_pb2", "chorus.proto.riva.riva_audio_pb2", "chorus.proto.riva.riva_common_pb2"],
    "riva": ["riva.client.proto.riva_tts_pb2", "riva.client.proto.riva_audio_pb2", "riva.client.proto.riva_common_pb2"],
}[sys.argv[1]]
out = {}
def message(prefix, m):
    out[prefix + m.name] = sorted((f.name, f.number, f.type, f.label, f.type_name) for f in m.field)
    for nested in m.nested_type:
        message(prefix + m.name + ".", nested)
for name in modules:
    fd = descriptor_pb2.FileDescriptorProto()
    __import__(name, fromlist=["DESCRIPTOR"]).DESCRIPTOR.CopyToProto(fd)
    for m in fd.message_type:
        message(fd.package + ".", m)
    for e in fd.enum_type:
        out[fd.package + "." + e.name] = sorted((v.name, v.number) for v in e.value)
    for s in fd.service:
        out[fd.package + "." + s.name] = sorted(
            (m.name, m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in s.method)
print(json.dumps(out, sort_keys=True))
"""


def describe(side: str) -> dict:
    done = subprocess.run([sys.executable, "-c", DESCRIBE, side], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_riva_protos_match_the_pinned_client():
    ours, theirs = describe("chorus"), describe("riva")
    assert "nvidia.riva.tts.RivaSpeechSynthesis" in ours
    assert ours == theirs
