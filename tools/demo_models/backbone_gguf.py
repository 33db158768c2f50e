"""Writes a random-weight Orpheus-shaped backbone GGUF.

What is exact: the Orpheus vocabulary (156,940 tokens; the Llama-3 specials and every
`<custom_token_N>` at 128256 + N as CONTROL tokens), the special ids, the Llama-3
byte-level BPE tokenizer type (so any UTF-8 text tokenizes, byte by byte), rope
theta 500000 with llama3 frequency scaling, and tied embeddings. What is small: the
transformer (hidden 256, 4 layers, FFN 768, 4 heads, 2 KV heads), sized so that one
stream generates several times faster than real time on 2 CPU cores. Random weights
speak noise, but cost what a model of this size costs.
Matrices are Q8_0, as deployed Orpheus GGUFs are quantized: llama.cpp's quantized
CPU matmul gives a sequence the same logits whatever else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chorus.speech import orpheus


@dataclass(frozen=True)
class BackboneShape:
    hidden: int = 256
    layers: int = 4
    ffn: int = 768
    heads: int = 4
    kv_heads: int = 2
    context_length: int = 8192
    rope_theta: float = 500_000.0
    rms_eps: float = 1e-5
    # Llama-3.2 rope scaling (what Orpheus 3B inherits).
    rope_factor: float = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Names of the Llama-3 special tokens that have one; the rest are reserved.
_LLAMA3_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-printable-character table, in vocabulary order.

    Byte-level BPE vocabularies (Llama-3's included) start with these 256
    characters, which is what lets any UTF-8 text tokenize.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return [chr(c) for c in codepoints]


def orpheus_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of the demo tokenizer."""
    from gguf import TokenType

    byte_chars = bytes_to_unicode()
    # One merge (two spaces) because llama.cpp requires a merges list for BPE.
    merged = byte_chars[ord(" ")] * 2  # 'ĠĠ'
    tokens = byte_chars + [merged]
    types = [int(TokenType.NORMAL)] * len(tokens)
    # Fill the rest of the Llama-3 text range with tokens BPE can never produce.
    tokens += [f"<|demo_filler_{i}|>" for i in range(len(tokens), orpheus.BOS)]
    types += [int(TokenType.UNUSED)] * (orpheus.BOS - len(types))
    reserved = 2
    for token_id in range(orpheus.BOS, orpheus.TEXT_VOCAB_SIZE):
        name = _LLAMA3_SPECIALS.get(token_id)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        tokens.append(name)
        types.append(int(TokenType.CONTROL))
    for n in range(orpheus.N_CUSTOM_TOKENS):
        tokens.append(f"<custom_token_{n}>")
        types.append(int(TokenType.CONTROL))
    assert len(tokens) == orpheus.VOCAB_SIZE
    return tokens, types, [f"{byte_chars[ord(' ')]} {byte_chars[ord(' ')]}"]


def llama3_rope_factors(shape: BackboneShape) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, as convert_hf_to_gguf writes them
    into `rope_freqs.weight`."""
    dim = shape.head_dim
    freqs = 1.0 / (shape.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_wavelen = shape.rope_original_context / shape.rope_low_freq_factor
    high_wavelen = shape.rope_original_context / shape.rope_high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(shape.rope_factor)
        else:
            smooth = (shape.rope_original_context / wavelen - shape.rope_low_freq_factor) / (
                shape.rope_high_freq_factor - shape.rope_low_freq_factor
            )
            factors.append(1.0 / ((1 - smooth) / shape.rope_factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_blocks(writer, shape: BackboneShape, add_matrix, qkv_bias: bool = False) -> None:
    """The final norm and the transformer blocks (Llama's tensor names, which Qwen2
    shares; Qwen2 adds biases to q, k and v). `add_matrix(name, rows, cols)` writes a
    random quantized matrix."""
    writer.add_tensor("output_norm.weight", np.ones(shape.hidden, dtype=np.float32))
    kv_dim = shape.kv_heads * shape.head_dim
    for i in range(shape.layers):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(shape.hidden, dtype=np.float32))
        add_matrix(f"{blk}.attn_q.weight", shape.hidden, shape.hidden)
        add_matrix(f"{blk}.attn_k.weight", kv_dim, shape.hidden)
        add_matrix(f"{blk}.attn_v.weight", kv_dim, shape.hidden)
        if qkv_bias:
            for name, size in (("attn_q", shape.hidden), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                writer.add_tensor(f"{blk}.{name}.bias", np.zeros(size, dtype=np.float32))
        add_matrix(f"{blk}.attn_output.weight", shape.hidden, shape.hidden)
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(shape.hidden, dtype=np.float32))
        add_matrix(f"{blk}.ffn_gate.weight", shape.ffn, shape.hidden)
        add_matrix(f"{blk}.ffn_up.weight", shape.ffn, shape.hidden)
        add_matrix(f"{blk}.ffn_down.weight", shape.hidden, shape.ffn)


@dataclass(frozen=True)
class Tokenizer:
    """A byte-level BPE tokenizer as GGUF metadata."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str  # llama.cpp's pre-tokenizer name
    bos: int
    eos: int
    add_bos: bool


def write_gguf(path: Path, arch: str, name: str, shape: BackboneShape, seed: int, tokenizer: Tokenizer,
               tensors, extra: dict[str, str] | None = None) -> Path:
    """Writes a demo GGUF: the hyperparameters, `extra` string keys, the tokenizer,
    then `tensors(writer, add_matrix)`, where add_matrix(name, rows, cols) writes a
    random Q8_0 matrix. Same seed, same bytes."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def add_matrix(name: str, rows: int, cols: int, std: float = 0.02) -> None:
        weights = rng.standard_normal((rows, cols), dtype=np.float32) * std
        writer.add_tensor(name, gguf.quants.quantize(weights, Q8_0), raw_dtype=Q8_0)

    Q8_0 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(len(tokenizer.tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.types)
    writer.add_token_merges(tokenizer.merges)
    writer.add_bos_token_id(tokenizer.bos)
    writer.add_eos_token_id(tokenizer.eos)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)

    tensors(writer, add_matrix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_demo_backbone(path: Path, seed: int = 0, shape: BackboneShape = BackboneShape()) -> Path:
    """Writes the GGUF and returns its path. Same seed, same bytes."""
    tokens, types, merges = orpheus_vocabulary()

    def tensors(writer, add_matrix) -> None:
        # Tied embeddings: no output.weight, llama.cpp reuses token_embd.
        add_matrix("token_embd.weight", orpheus.VOCAB_SIZE, shape.hidden)
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(shape))
        write_blocks(writer, shape, add_matrix)

    tokenizer = Tokenizer(tokens, types, merges, "llama-bpe", orpheus.BOS, orpheus.END_OF_TEXT, add_bos=True)
    return write_gguf(path, "llama", "chorus-demo-orpheus", shape, seed, tokenizer, tensors)
