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

import numpy as np

from chorus.speech import neutts
from tools.demo_models.backbone_gguf import BackboneShape, _bytes_to_unicode, write_blocks

QWEN2_TEXT_TOKENS = 151_643  # byte-level BPE tokens before Qwen2's specials
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<|qwen2_special_{i}|>" for i in range(3, 22)
]
ENDOFTEXT = QWEN2_TEXT_TOKENS
DEMO_SHAPE = BackboneShape(context_length=32_768, rope_theta=1_000_000.0, rms_eps=1e-6)


def neutts_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of the demo tokenizer."""
    from gguf import TokenType

    byte_chars = _bytes_to_unicode()
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
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Q8_0 = gguf.GGMLQuantizationType.Q8_0

    def add_matrix(name: str, rows: int, cols: int, std: float = 0.02) -> None:
        weights = rng.standard_normal((rows, cols), dtype=np.float32) * std
        writer.add_tensor(name, gguf.quants.quantize(weights, Q8_0), raw_dtype=Q8_0)

    tokens, types, merges = neutts_vocabulary()
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("chorus-demo-neutts-air")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_string(neutts.INPUT_FORMAT_KEY, neutts.PHONEMES)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ENDOFTEXT)
    writer.add_eos_token_id(ENDOFTEXT)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)

    add_matrix("token_embd.weight", len(tokens), shape.hidden)  # tied: no output.weight
    write_blocks(writer, shape, add_matrix, qkv_bias=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
