"""NVIDIA Riva's TTS service on the gateway's gRPC port (protos/riva)."""
