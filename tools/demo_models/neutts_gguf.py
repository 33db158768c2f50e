"""Writes a random-weight NeuTTS-Air-shaped backbone GGUF (Qwen2 architecture).

What is exact: the architecture llama.cpp loads (qwen2: biases on q, k and v, rope
theta 1,000,000, tied embeddings), a byte-level BPE tokenizer (any UTF-8 text, the
IPA of phonemes included, tokenizes byte by byte), Qwen2's vocabulary size and
special tokens, NeuTTS's prompt specials and the 65,536 `<|speech_N|>` tokens after
them, and `neuphonic.input_format = phonemes`. Where real checkpoints put those tokens
is read by name when one loads (chorus.speech.neutts.resolve), so their ids here need
not match. What is small: the transformer, the Orpheus demo's size (hidden 256, 4
layers, FFN 768, 4 heads, 2 KV heads) instead of Qwen2-0.5B's 896 and 24. Matrices are
Q8_0.
"""

from __future__ import annotations

from pathlib import Path


from chorus.speech import neutts
from tools.demo_models.backbone_gguf import BackboneShape, Tokenizer, bytes_to_unicode, write_blocks, write_gguf

QWEN2_TEXT_TOKENS = 151_643  # byte-level BPE tokens before Qwen2's specials
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<|qwen2_special_{i}|>" for i in range(3, 22)
]
ENDOFTEXT = QWEN2_TEXT_TOKENS
DEMO_SHAPE = BackboneShape(context_length=32_768, rope_theta=1_000_000.0, rms_eps=1e-6)


def neutts_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of the demo tokenizer."""
    from gguf import TokenType

    byte_chars = bytes_to_unicode()
    merged = byte_chars[ord(" ")] * 2
    tokens = byte_chars + [merged]
    types = [int(TokenType.NORMAL)] * len(tokens)
    tokens += [f"<|demo_filler_{i}|>" for i in range(len(tokens), QWEN2_TEXT_TOKENS)]
    types += [int(TokenType.UNUSED)] * (QWEN2_TEXT_TOKENS - len(types))
    for name in [*QWEN2_SPECIALS, *neutts.SPECIALS]:
        tokens.append(name)
        types.append(int(TokenType.CONTROL))
    for code in range(neutts.CODEBOOK_SIZE):
        tokens.append(neutts.speech_token(code))
        types.append(int(TokenType.USER_DEFINED))
    return tokens, types, [f"{byte_chars[ord(' ')]} {byte_chars[ord(' ')]}"]


def write_demo_neutts_backbone(path: Path, seed: int = 0, shape: BackboneShape = DEMO_SHAPE) -> Path:
    """Writes the GGUF and returns its path. Same seed, same bytes."""
    tokens, types, merges = neutts_vocabulary()

    def tensors(writer, add_matrix) -> None:
        add_matrix("token_embd.weight", len(tokens), shape.hidden)  # tied: no output.weight
        write_blocks(writer, shape, add_matrix, qkv_bias=True)

    tokenizer = Tokenizer(tokens, types, merges, "qwen2", ENDOFTEXT, ENDOFTEXT, add_bos=False)
    return write_gguf(path, "qwen2", "chorus-demo-neutts-air", shape, seed, tokenizer, tensors,
                      extra={neutts.INPUT_FORMAT_KEY: neutts.PHONEMES})
