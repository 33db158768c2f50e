"""Demo models: random weights in the exact shapes and layouts of the real ones.

No model hub is reachable where Chorus is built and tested, so the demo builder
writes a backbone GGUF with the Orpheus vocabulary and a SNAC 24 kHz directory. The
services load them through the same code that loads real weights from a path.
"""
