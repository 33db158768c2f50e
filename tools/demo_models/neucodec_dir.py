"""Writes a NeuCodec directory with random weights: the decoder (config.json +
pytorch_model.bin) and the encoder (encoder.json, semantic_model/, and its tensors in the
same pytorch_model.bin).

The real decoder (hidden 1024, 12 transformer blocks, about 190 M parameters) would
need several cores to stream in real time; the demo keeps every real size that the
wire and the audio see (65,536 codes, 50 frames a second, hop 480, n_fft 1,920,
24 kHz, the 2,048-wide quantizer output) and scales the body down to hidden 256 and
4 blocks. Initialisation follows neucodec's: convolutions from a normal of std 0.02
truncated at 2 std, biases zero, linear layers torch's default.

The real encoder (a 38 M-parameter acoustic encoder and the first 16 layers, 390 M
parameters, of Wav2Vec2-BERT) would take seconds a reference on two cores. The demo keeps what its
input and output see and the arithmetic of every piece: 16 kHz in, the acoustic
strides (2, 2, 4, 4, 5) and dilations (1, 3, 9), the anti-aliased SnakeBeta, the 80-bin
log-mel features stacked in pairs, Wav2Vec2-BERT's conformer layers with their
relative-key attention and 31-tap convolution, the 2,048-wide fc_prior and the 8 FSQ
levels of 4. It scales the widths down: 4 base channels in place of 48 (so 128 in place
of 1,536 after the last stride), 64-wide acoustic and semantic features in place of
1,024, and a Wav2Vec2-BERT of hidden size 64 with 2 layers (hidden_states[2] is read, in
place of [16]). Its tensors are stored as a real checkpoint stores them, under the real
keys: the acoustic convolutions as weight norm pairs (weight_g, weight_v, with v
scaled per channel so that only the folded weight is right), beside the resampling
filters (.filter), so that loading exercises the folding and the skipping. Its
initialisation is not neucodec's (which, untrained, would give one code for any
input): acoustic convolutions of std 0.8 / sqrt(fan in), SnakeBeta's α and β drawn
around 1, and a project_in scaled so that every FSQ digit is used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.codec_worker.neucodec_encoder import ENCODER_CONFIG_FILE, SEMANTIC_MODEL_DIR, NeuCodecEncoderShape
from services.codec_worker.neucodec_model import CONFIG_FILE, WEIGHTS_FILE, NeuCodecShape

DEMO_SHAPE = NeuCodecShape(hidden=256, depth=4, heads=4)
DEMO_ENCODER_SHAPE = NeuCodecEncoderShape(ngf=4, acoustic_dim=64, semantic_dim=64, semantic_layer=2)
# Wav2Vec2BertConfig's arguments; the rest are its defaults, which are w2v-bert-2.0's
# (relative-key positions 64 back and 8 ahead, a 31-tap depthwise convolution, ...).
DEMO_SEMANTIC_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            feature_projection_input_dim=160, position_embeddings_type="relative_key")
# The acoustic convolutions' std times sqrt(fan in): at 1 the snakes' positive bias grows
# through the six stages, at 0.02 (neucodec's) the branch fades to nothing; at 0.8 it
# stays near unit scale for quiet to loud inputs. project_in's gain over torch's default
# then spreads the latents over all four FSQ levels rather than the middle two.
_CONV_GAIN = 0.8
_PROJECT_IN_GAIN = 10.0


def write_demo_neucodec(out_dir: Path, seed: int = 0, shape: NeuCodecShape = DEMO_SHAPE,
                        encoder_shape: NeuCodecEncoderShape = DEMO_ENCODER_SHAPE) -> Path:
    """Writes the directory and returns it. Same seed, same bytes. The decoder's tensors
    are drawn first, so they are what a decoder-only writer drew."""
    import torch

    from services.codec_worker.neucodec_model import NeuCodecDecoder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(shape.to_json())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NeuCodecDecoder(shape)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):
                torch.nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                torch.nn.init.zeros_(module.bias)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        state.update(_write_demo_encoder(out_dir, shape, encoder_shape))
    torch.save(state, out_dir / WEIGHTS_FILE)
    return out_dir


def _write_demo_encoder(out_dir: Path, shape: NeuCodecShape, encoder_shape: NeuCodecEncoderShape) -> dict:
    """Writes encoder.json and semantic_model/ (drawing from torch's generator as it
    stands) and returns the encoder's tensors under a real checkpoint's keys."""
    import torch
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    from services.codec_worker.alias_free import CUTOFF, HALF_WIDTH, KERNEL_SIZE, Activation1d, kaiser_sinc_filter
    from services.codec_worker.neucodec_encoder import NeuCodecEncoder

    (out_dir / ENCODER_CONFIG_FILE).write_text(encoder_shape.to_json())
    semantic = Wav2Vec2BertModel(Wav2Vec2BertConfig(**DEMO_SEMANTIC_CONFIG))
    shutil.rmtree(out_dir / SEMANTIC_MODEL_DIR, ignore_errors=True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a bar for one small shard is noise in `chorus serve`'s output
    semantic.save_pretrained(out_dir / SEMANTIC_MODEL_DIR)

    encoder = NeuCodecEncoder(encoder_shape, shape, semantic)
    with torch.no_grad():
        for module in encoder.CodecEnc.modules():
            if isinstance(module, torch.nn.Conv1d):
                fan_in = module.in_channels * module.kernel_size[0]
                torch.nn.init.normal_(module.weight, std=_CONV_GAIN * fan_in**-0.5)
                torch.nn.init.zeros_(module.bias)
            elif isinstance(module, Activation1d):
                torch.nn.init.normal_(module.act.alpha, std=0.2)
                torch.nn.init.normal_(module.act.beta, std=0.2)
        encoder.quantizer_in.weight.mul_(_PROJECT_IN_GAIN)

    state = {}
    taps = kaiser_sinc_filter(CUTOFF, HALF_WIDTH, KERNEL_SIZE).view(1, 1, KERNEL_SIZE)
    for name, module in encoder.named_modules():
        if isinstance(module, Activation1d):  # the reference's persistent filter buffers
            state[f"{name}.upsample.filter"] = taps.clone()
            state[f"{name}.downsample.lowpass.filter"] = taps.clone()
    weight_norm = {f"{name}.weight" for name, module in encoder.CodecEnc.named_modules(prefix="CodecEnc")
                   if isinstance(module, torch.nn.Conv1d)}
    for key, value in encoder.state_dict().items():
        if key.startswith("semantic_model."):
            continue
        value = value.detach().clone().contiguous()
        if key.startswith("quantizer_in."):
            key = "generator.quantizer.project_in." + key[len("quantizer_in."):]
        if key in weight_norm:  # stored as g and v, with v off by a per-channel factor
            stem = key[: -len(".weight")]
            g = torch.linalg.vector_norm(value, dim=(1, 2), keepdim=True)
            v = value * torch.empty(value.shape[0], 1, 1).uniform_(0.5, 2.0)
            state[stem + ".weight_g"], state[stem + ".weight_v"] = g.contiguous(), v.contiguous()
        else:
            state[key] = value
    return state
