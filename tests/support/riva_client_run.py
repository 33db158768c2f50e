"""Runs NVIDIA's own `nvidia-riva-client` against a gateway, as a separate process
(its generated protos and Chorus's restatement of them cannot share one protobuf
descriptor pool), and prints what it got as one JSON line.

    python tests/support/riva_client_run.py ADDRESS synthesize|online|config [JSON options]
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import riva.client


def _summary(metadata) -> dict:
    meta = dict(metadata or ())
    raw = meta.get("chorus-summary-bin")
    return {"summary_bin": base64.b64encode(raw).decode() if raw else None,
            "readable": {k: v for k, v in meta.items() if k.startswith("chorus-") and not k.endswith("-bin")}}


def main() -> None:
    address, mode = sys.argv[1], sys.argv[2]
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    service = riva.client.SpeechSynthesisService(riva.client.Auth(uri=address))
    encoding = getattr(riva.client.AudioEncoding, options.pop("encoding", "LINEAR_PCM"))
    if mode == "config":
        reply = service.stub.GetRivaSynthesisConfig(riva.client.proto.riva_tts_pb2.RivaSynthesisConfigRequest())
        print(json.dumps([{"model_name": c.model_name, "parameters": dict(c.parameters)} for c in reply.model_config]))
        return
    text = options.pop("text")
    if "zero_shot_audio_prompt_file" in options:  # the client opens it as a Path
        options["zero_shot_audio_prompt_file"] = Path(options["zero_shot_audio_prompt_file"])
    if mode == "synthesize":
        future = service.synthesize(text, encoding=encoding, future=True, **options)
        response = future.result()
        out = {"audio": base64.b64encode(response.audio).decode(), "id": response.id.value, "responses": 1,
               **_summary(future.trailing_metadata())}
    else:
        chunks, ids = [], set()
        responses = service.synthesize_online(text, encoding=encoding, **options)
        for response in responses:
            chunks.append(response.audio)
            ids.add(response.id.value)
        out = {"audio": base64.b64encode(b"".join(chunks)).decode(), "id": ",".join(sorted(ids)),
               "responses": len(chunks), **_summary(responses.trailing_metadata())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
