"""The gateway's client doors, side by side: tts.v1 (`tts_v1`), NVIDIA Riva's TTS
service (`riva/`) and OpenAI's speech endpoint with the browser page (`openai_http/`,
`web/`). Each maps its own wire format onto the one synthesis; what every door does
alike around that lives once, in `shell`. `gateway.server` builds and registers them.
"""
