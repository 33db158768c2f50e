"""The backbone through llama-cpp-python's low-level API (pinned: 0.3.36).

Kept apart from the scheduler so that the engine reads as scheduling, and so that
every ctypes detail (batch arrays, logits pointers, log callback lifetime) lives in
one place.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import llama_cpp as llama
import numpy as np

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


def _quiet_llama_log(level, text, user_data) -> None:
    if level == 4:  # GGML_LOG_LEVEL_ERROR; the rest is load chatter
        log.error("llama.cpp: %s", text.decode(errors="replace").rstrip())


# llama.cpp keeps the raw function pointer: the Python object must outlive every
# call into the library, or the next log line segfaults.
_LOG_CALLBACK = llama.llama_log_callback(_quiet_llama_log)


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama.llama_backend_init()
            llama.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
            _backend_ready = True


class TokenBatch:
    """A llama_batch with numpy views over its token/pos/logits arrays, so that
    chunked prefill fills hundreds of entries without a Python loop per field."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self.capacity = capacity
        self._batch = llama.llama_batch_init(capacity, 0, n_seq_max)
        self.tokens = np.ctypeslib.as_array(self._batch.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(self._batch.pos, shape=(capacity,))
        self.n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(self._batch.logits, shape=(capacity,))
        self._seq_id = self._batch.seq_id
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, tokens: np.ndarray | list[int], first_pos: int, seq: int, want_last_logits: bool) -> int:
        """Appends a run of one sequence's tokens; returns the batch index of the last
        token when its logits are wanted (else -1)."""
        n = len(tokens)
        start, end = self.n_tokens, self.n_tokens + n
        if end > self.capacity:
            raise ValueError(f"batch overflow: {end} > {self.capacity}")
        self.tokens[start:end] = tokens
        self.pos[start:end] = np.arange(first_pos, first_pos + n)
        self.n_seq_id[start:end] = 1
        self.logits[start:end] = 0
        seq_id = self._seq_id
        for i in range(start, end):
            seq_id[i][0] = seq
        self.n_tokens = end
        if want_last_logits:
            self.logits[end - 1] = 1
            return end - 1
        return -1

    @property
    def raw(self):
        self._batch.n_tokens = self.n_tokens
        return self._batch

    def free(self) -> None:
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None


class LlamaBackbone:
    """One model and one context with `n_seq_max` sequences, each in its own KV stream.

    Per-sequence streams (kv_unified=False) rather than one shared cache: in a
    unified cache a sequence's cells interleave with other sequences', attention
    then sums in a different order, and logits drift by ~1e-3 with the batch's
    make-up, which flips greedy and seeded picks. With a stream per sequence, and
    quantized weights (Q8_0, Q4_K...: their CPU matmul quantizes each activation row
    on its own), a request's logits are bit-identical alone or batched, at the same
    steps/s (measured side by side on the demo model), and each slot owns exactly
    n_ctx / n_seq_max positions. F16/F32 weights take a different kernel for a
    one-token batch than for a larger one, so their outputs drift by ~1e-4.
    Flash attention stays off: its CPU kernel accumulates in F16, so a prompt's
    logits depended (by ~1e-2) on where chunked prefill cut it.
    """

    def __init__(
        self, model_path: Path, n_ctx: int, n_batch: int, n_seq_max: int, threads: int, gpu_layers: int = 0
    ) -> None:
        init_backend()
        model_params = llama.llama_model_default_params()
        # Layers kept in VRAM; llama.cpp reads a negative count as all of them.
        model_params.n_gpu_layers = gpu_layers
        self.gpu_layers = gpu_layers
        self.model = llama.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}: is it a GGUF of a llama-architecture model?")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        ctx_params = llama.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = n_seq_max
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.kv_unified = False
        ctx_params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            llama.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens x {n_seq_max} sequences")
        self.memory = llama.llama_get_memory(self.ctx)
        self.n_ctx = llama.llama_n_ctx(self.ctx)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Text to ids; special-token text in user input stays text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, False)
        if n < 0:
            raise ValueError(f"tokenizer needed {-n} tokens, more than {capacity}")
        return list(buf[:n])

    def token_text(self, token: int) -> str:
        """The vocabulary's text of a token id, as the GGUF spells it."""
        raw = llama.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text, None when the file has no such key."""
        buf = ctypes.create_string_buffer(1024)
        n = llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", errors="replace")

    def decode(self, batch: TokenBatch) -> None:
        rc = llama.llama_decode(self.ctx, batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on a batch of {batch.n_tokens} tokens")

    def logits_at(self, batch_index: int) -> np.ndarray:
        """Logits of the token at `batch_index` of the last decode (a view, valid until
        the next decode). By batch index, not output row: split ubatches may reorder
        outputs, and llama_get_logits_ith maps them back."""
        ptr = llama.llama_get_logits_ith(self.ctx, batch_index)
        if not ptr:
            raise RuntimeError(f"no logits for batch index {batch_index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def clear_sequence(self, seq: int) -> None:
        llama.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def sequence_length(self, seq: int) -> int:
        """Tokens of `seq` in the KV cache (0 when empty)."""
        return int(llama.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def close(self) -> None:
        if self.ctx:
            llama.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama.llama_model_free(self.model)
            self.model = None
