"""NeuCodec's encoder (reference audio at 16 kHz -> codes), on the demo encoder: random
weights in the real arithmetic (strides, SnakeBeta, Wav2Vec2-BERT's layers, FSQ), the
widths scaled down, stored as a real checkpoint stores them."""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from services.codec_worker.alias_free import (
    CUTOFF,
    HALF_WIDTH,
    KERNEL_SIZE,
    Activation1d,
    SnakeBeta,
    kaiser_sinc_filter,
)
from services.codec_worker.neucodec_encoder import (
    ENCODER_CONFIG_FILE,
    FRAME_HOP,
    SEMANTIC_MODEL_DIR,
    NeuCodecEncoder,
    NeuCodecEncoderShape,
    encoded_frames,
    fold_weight_norm,
    fsq_indices,
    load_neucodec_encoder,
)
from services.codec_worker.neucodec_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    NeuCodecLoadError,
    NeuCodecShape,
    _ResidualFsq,
    load_neucodec,
)
from tools.demo_models.neucodec_dir import DEMO_ENCODER_SHAPE, DEMO_SHAPE, write_demo_neucodec

pytest.importorskip("transformers")

RATE = 16_000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_demo_neucodec(tmp_path_factory.mktemp("neucodec"), seed=3)


@pytest.fixture(scope="module")
def encoder(model_dir) -> NeuCodecEncoder:
    return load_neucodec_encoder(model_dir)


@pytest.fixture(scope="module")
def checkpoint(model_dir) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / WEIGHTS_FILE, weights_only=True)


def noise(samples: int, seed: int = 0, level: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(samples) * level).astype(np.float32)


def copy_dir(model_dir, tmp_path, state=None):
    """A copy of the demo directory, with `state` as its checkpoint if given."""
    out = tmp_path / "copy"
    shutil.copytree(model_dir, out)
    if state is not None:
        torch.save(state, out / WEIGHTS_FILE)
    return out


# --- frames, range, determinism -------------------------------------------------------


def test_frame_count_rule():
    """T samples -> T // 320 codes: neucodec pads to the next multiple of 320 (a whole 320
    on an exact multiple), giving T // 320 + 1 acoustic frames and one fewer semantic
    frame, and cuts both to the shorter."""
    assert [encoded_frames(t) for t in (0, 319, 320, 639, 640, 31_999, 32_000, 32_319, 32_320)] == [
        0, 0, 1, 1, 2, 99, 100, 100, 101]


@pytest.mark.parametrize("samples", [320, 639, 640, 2 * RATE - 1, 2 * RATE, 2 * RATE + 1])
def test_encode_gives_the_rule_s_frames_in_range_as_int32(encoder, samples):
    codes = encoder.encode(noise(samples))
    assert codes.dtype == np.int32 and codes.shape == (samples // FRAME_HOP,)
    assert codes.min() >= 0 and codes.max() < 65_536


def test_the_two_branches_differ_by_one_frame_and_are_cut_to_the_shorter(encoder):
    """The rule above, branch by branch, on a length that is a multiple of 320."""
    samples = torch.from_numpy(noise(2 * RATE))
    padded = torch.nn.functional.pad(samples, (0, FRAME_HOP))  # neucodec pads a multiple by a whole hop
    with torch.inference_mode():
        acoustic = encoder.CodecEnc(padded[None, None])
        features = encoder.features(padded.numpy(), sampling_rate=RATE, return_tensors="pt").input_features
    assert acoustic.shape == (1, DEMO_ENCODER_SHAPE.acoustic_dim, 101)
    assert features.shape == (1, 100, 160)
    assert encoder.encode(samples.numpy()).shape == (100,)


def test_same_input_same_codes_and_the_demo_uses_the_codebook(encoder):
    audio = noise(2 * RATE, seed=5)
    first, second = encoder.encode(audio), encoder.encode(audio.copy())
    np.testing.assert_array_equal(first, second)
    # The demo's initialisation spreads the latents over the levels: not one code for all.
    assert len(set(first.tolist())) > 20
    digits = (first[:, None] // 4 ** np.arange(8)) % 4
    assert len(set(digits.ravel().tolist())) == 4
    assert not np.array_equal(first, encoder.encode(noise(2 * RATE, seed=6)))


def test_encodes_the_demo_decoder_s_audio_resampled_to_16_khz(model_dir, encoder):
    decoder = load_neucodec(model_dir)
    codes = torch.randint(0, DEMO_SHAPE.codebook_size, (1, 60), generator=torch.Generator().manual_seed(1))
    audio = decoder.decode(codes)[0].numpy()  # 24 kHz
    times = np.arange(audio.size * 2 // 3) / RATE
    reference = np.interp(times, np.arange(audio.size) / 24_000, audio).astype(np.float32)
    assert reference.size == 60 * FRAME_HOP
    out = encoder.encode(reference)
    assert out.shape == (60,) and out.min() >= 0 and out.max() < 65_536


# --- the quantizer ----------------------------------------------------------------------


def reference_bound(z: torch.Tensor, level: int = 4) -> torch.Tensor:
    """FSQ's bound for one level count, written out from its formula."""
    half_l = (level - 1) * (1 + 1e-3) / 2
    offset = 0.5 if level % 2 == 0 else 0.0
    return torch.tanh(z + math.atanh(offset / half_l)) * half_l - offset


def test_fsq_indices_decode_through_the_decoder_s_digit_map_to_the_quantized_values():
    """The encoder's index, read back by the decoder's _ResidualFsq (digit d -> (d - 2) / 2,
    project_out the identity), is round(bound(bound(z))) / 2: the value ResidualFSQ
    quantizes z to."""
    z = torch.cat([torch.linspace(-4, 4, 41)[:, None].expand(41, 8),  # every level on every digit
                   torch.randn(200, 8, generator=torch.Generator().manual_seed(0)) * 2])
    indices = fsq_indices(z, (4,) * 8)
    assert indices.dtype == torch.int64 and 0 <= int(indices.min()) and int(indices.max()) < 65_536
    expected = torch.round(reference_bound(reference_bound(z))) / 2
    assert set(expected.unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}

    decode = _ResidualFsq(NeuCodecShape(vq_dim=8))
    with torch.no_grad():
        decode.project_out.weight.copy_(torch.eye(8))
        decode.project_out.bias.zero_()
        values = decode(indices)
    torch.testing.assert_close(values, expected, rtol=0, atol=0)


def test_fsq_extremes_and_zero():
    """z = 0 bounds to 0 twice (the shift cancels the offset): digit 2, value 0; very
    negative z gives digit 0 (-1), very positive digit 3 (0.5); the first value is the
    least significant digit."""
    base4 = 4 ** torch.arange(8)
    assert int(fsq_indices(torch.zeros(8), (4,) * 8)) == int((2 * base4).sum())
    assert int(fsq_indices(torch.full((8,), -10.0), (4,) * 8)) == 0
    assert int(fsq_indices(torch.full((8,), 10.0), (4,) * 8)) == 65_535
    one_high = torch.zeros(8)
    one_high[0] = 10.0
    assert int(fsq_indices(one_high, (4,) * 8)) == int((2 * base4).sum()) + 1


# --- weight norm --------------------------------------------------------------------------


def test_folded_weight_norm_gives_the_same_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old spelling is deprecated, and neucodec's
        old = torch.nn.utils.weight_norm(nn.Conv1d(3, 5, 7, dilation=2, padding=6))
    new = torch.nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 5, 4, stride=2, padding=1))
    with torch.no_grad():  # g no longer |v|, as after training
        old.weight_g.mul_(torch.rand(5, 1, 1) + 0.5)
        new.parametrizations.weight.original0.mul_(torch.rand(5, 1, 1) + 0.5)
    for wn, conv in ((old, nn.Conv1d(3, 5, 7, dilation=2, padding=6)), (new, nn.Conv1d(3, 5, 4, stride=2, padding=1))):
        folded = fold_weight_norm(wn.state_dict())
        assert set(folded) == {"weight", "bias"}
        conv.load_state_dict(folded)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), wn(x), rtol=1e-5, atol=1e-6)


def test_demo_checkpoint_is_in_the_real_format_and_loads_folded(encoder, checkpoint):
    conv = "CodecEnc.conv_blocks.2.block.1.block.1"
    assert f"{conv}.weight_g" in checkpoint and f"{conv}.weight" not in checkpoint
    assert "CodecEnc.conv_blocks.2.block.0.block.0.upsample.filter" in checkpoint
    assert "CodecEnc.conv_final_block.0.downsample.lowpass.filter" in checkpoint
    assert "generator.quantizer.project_in.weight" in checkpoint
    g, v = checkpoint[f"{conv}.weight_g"], checkpoint[f"{conv}.weight_v"]
    loaded = encoder.CodecEnc.conv_blocks[2].block[1].block[1].weight
    torch.testing.assert_close(loaded, g * v / v.norm(dim=(1, 2), keepdim=True))
    assert not torch.allclose(loaded, v)  # the demo's v is off by a factor per channel: folding matters
    assert not any(name.endswith("filter") for name in encoder.state_dict())
    assert all(not isinstance(m, nn.Conv1d) or not torch.nn.utils.parametrize.is_parametrized(m)
               for m in encoder.modules())


def test_plain_weights_load_to_the_same_codes(model_dir, encoder, checkpoint, tmp_path):
    plain = fold_weight_norm({k: v for k, v in checkpoint.items() if not k.endswith(".filter")})
    other = load_neucodec_encoder(copy_dir(model_dir, tmp_path, plain))
    audio = noise(RATE, seed=2)
    np.testing.assert_array_equal(other.encode(audio), encoder.encode(audio))


# --- the anti-aliased activation ------------------------------------------------------


def test_resampling_filter_is_the_kaiser_windowed_sinc():
    taps = kaiser_sinc_filter(CUTOFF, HALF_WIDTH, KERNEL_SIZE)
    assert taps.shape == (12,) and taps.dtype == torch.float32
    assert abs(float(taps.sum()) - 1) < 1e-6
    torch.testing.assert_close(taps, taps.flip(0), rtol=0, atol=0)
    # Written out with numpy: Kaiser's beta for the attenuation the length and width give.
    attenuation = 2.285 * (6 - 1) * math.pi * (4 * 0.3) + 7.95
    assert attenuation > 50
    times = np.arange(-6, 6) + 0.5
    expected = np.kaiser(12, 0.1102 * (attenuation - 8.7)) * np.sinc(0.5 * times)
    np.testing.assert_allclose(taps.numpy(), expected / expected.sum(), rtol=1e-5, atol=1e-7)
    # Even and odd taps each sum to 1/2, so upsampling a constant by 2 keeps it constant.
    assert abs(float(taps[::2].sum()) - 0.5) < 1e-6 and abs(float(taps[1::2].sum()) - 0.5) < 1e-6


def test_activation_of_a_constant_is_the_activation_of_the_constant():
    torch.manual_seed(1)
    snake = SnakeBeta(3)
    with torch.no_grad():
        snake.alpha.normal_()
        snake.beta.normal_()
        x = torch.tensor([-1.3, 0.2, 2.5])[None, :, None].expand(2, 3, 64).contiguous()
        out = Activation1d(snake)(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, snake(x), rtol=1e-5, atol=1e-5)
        # and SnakeBeta is x + sin^2(e^a x) / e^b
        alpha, beta = snake.alpha.exp()[None, :, None], snake.beta.exp()[None, :, None]
        torch.testing.assert_close(snake(x), x + torch.sin(alpha * x) ** 2 / beta)


def test_resampling_passes_the_band_and_keeps_time():
    """With the identity as activation, up and down again return a sine well inside the
    band where it was (no delay), and damp one near the Nyquist frequency (gently: the
    filter has 12 taps, and its gain there is about 0.55)."""
    n = torch.arange(400, dtype=torch.float32)
    identity = Activation1d(nn.Identity())
    for freq in (0.01, 0.05, 0.1):
        x = torch.sin(2 * math.pi * freq * n)[None, None]
        torch.testing.assert_close(identity(x)[..., 24:-24], x[..., 24:-24], rtol=0, atol=1e-2)
    near_nyquist = torch.sin(2 * math.pi * 0.45 * n)[None, None]
    assert float(identity(near_nyquist)[..., 24:-24].abs().max()) < 0.6


# --- loading ----------------------------------------------------------------------------


def test_a_decoder_only_directory_has_no_encoder(model_dir, tmp_path):
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(model_dir / name, tmp_path / name)
    assert load_neucodec_encoder(tmp_path) is None
    assert load_neucodec(tmp_path) is not None  # the decoder skips the encoder's tensors


@pytest.mark.parametrize("drop, named", [
    ("CodecEnc.conv_blocks.3.block.4.weight_v", "CodecEnc.conv_blocks.3.block.4.weight"),
    ("SemanticEncoder_module.residual_blocks.1.bias", "SemanticEncoder_module.residual_blocks.1.bias"),
    ("generator.quantizer.project_in.bias", "generator.quantizer.project_in.bias"),
])
def test_a_missing_tensor_is_named(model_dir, checkpoint, tmp_path, drop, named):
    state = {k: v for k, v in checkpoint.items() if k != drop}
    with pytest.raises(NeuCodecLoadError, match=f"lacks 1 encoder tensors.*{named}"):
        load_neucodec_encoder(copy_dir(model_dir, tmp_path, state))


def test_fc_prior_must_feed_the_decoder_s_quantizer(model_dir, checkpoint, tmp_path):
    state = dict(checkpoint, **{"fc_prior.weight": torch.zeros(1024, 128), "fc_prior.bias": torch.zeros(1024)})
    with pytest.raises(NeuCodecLoadError, match="fc_prior gives 1024 channels.*vq_dim = 2048"):
        load_neucodec_encoder(copy_dir(model_dir, tmp_path, state))


def test_project_in_must_give_one_value_per_level(model_dir, checkpoint, tmp_path):
    state = dict(checkpoint, **{"generator.quantizer.project_in.weight": torch.zeros(6, 2048),
                                "generator.quantizer.project_in.bias": torch.zeros(6)})
    with pytest.raises(NeuCodecLoadError, match="project_in maps 2048 -> 6.*8 FSQ levels"):
        load_neucodec_encoder(copy_dir(model_dir, tmp_path, state))


def test_a_shape_that_does_not_match_encoder_json_is_refused(model_dir, checkpoint, tmp_path):
    key = "SemanticEncoder_module.final_conv.weight"
    state = dict(checkpoint, **{key: torch.zeros(64, 64, 5)})
    with pytest.raises(NeuCodecLoadError, match="does not match"):
        load_neucodec_encoder(copy_dir(model_dir, tmp_path, state))


def test_bad_encoder_json_and_a_short_semantic_model_are_refused(model_dir, tmp_path):
    out = copy_dir(model_dir, tmp_path)
    (out / ENCODER_CONFIG_FILE).write_text('{"ngf": 4, "colour": "blue"}')
    with pytest.raises(NeuCodecLoadError, match="unknown encoder config keys"):
        load_neucodec_encoder(out)
    (out / ENCODER_CONFIG_FILE).write_text(NeuCodecEncoderShape(
        ngf=4, acoustic_dim=64, semantic_dim=64, semantic_layer=3).to_json())
    with pytest.raises(NeuCodecLoadError, match="2 layers"):
        load_neucodec_encoder(out)
    shutil.rmtree(out / SEMANTIC_MODEL_DIR)
    with pytest.raises(NeuCodecLoadError, match="no semantic_model/"):
        load_neucodec_encoder(out)


def test_shape_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="must be 320"):
        NeuCodecEncoderShape(up_ratios=(2, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="input_rate must be 16000"):
        NeuCodecEncoderShape(input_rate=24_000)
    with pytest.raises(ValueError, match="semantic_layer"):
        NeuCodecEncoderShape(semantic_layer=0)
    for shape in (NeuCodecEncoderShape(), DEMO_ENCODER_SHAPE):
        assert NeuCodecEncoderShape.from_json(shape.to_json()) == shape


def test_only_the_layers_up_to_semantic_layer_are_kept_and_the_rest_change_nothing(model_dir, encoder, tmp_path):
    """A Wav2Vec2-BERT with a third layer: the encoder reads hidden_states[2], so it
    drops the third and gives the same codes."""
    from transformers import Wav2Vec2BertModel

    out = copy_dir(model_dir, tmp_path)
    torch.manual_seed(0)
    deeper = Wav2Vec2BertModel.from_pretrained(model_dir / SEMANTIC_MODEL_DIR, num_hidden_layers=3)
    shutil.rmtree(out / SEMANTIC_MODEL_DIR)
    deeper.save_pretrained(out / SEMANTIC_MODEL_DIR)
    other = load_neucodec_encoder(out)
    assert len(other.semantic_model.encoder.layers) == 2
    audio = noise(RATE, seed=4)
    np.testing.assert_array_equal(other.encode(audio), encoder.encode(audio))


def test_a_checkpoint_s_own_semantic_tensors_win_as_in_neucodec(model_dir, checkpoint, tmp_path):
    key = "encoder.layers.1.ffn2.output_dense.bias"
    value = torch.full((64,), 0.25)
    state = dict(checkpoint, **{f"semantic_model.{key}": value,
                                "semantic_model.encoder.layers.9.ffn2.output_dense.bias": torch.zeros(7)})
    other = load_neucodec_encoder(copy_dir(model_dir, tmp_path, state))
    torch.testing.assert_close(other.semantic_model.state_dict()[key], value)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("samples, message", [
    (np.zeros(0, np.float32), "at least 320"),
    (np.zeros(319, np.float32), "at least 320"),
    (np.zeros((2, 16_000), np.float32), "mono"),
    (np.zeros((16_000, 1), np.float32), "mono"),
    (np.array([0.0] * 999 + [np.nan], np.float32), "NaN or infinite"),
    (np.array([0.0] * 999 + [np.inf], np.float32), "NaN or infinite"),
    (np.zeros(16_000, np.int16), "float samples"),
    ([0.0] * 16_000, "numpy array"),
])
def test_bad_input_is_refused_with_a_reason(encoder, samples, message):
    with pytest.raises(ValueError, match=message):
        encoder.encode(samples)


def test_float64_and_silence_are_accepted(encoder):
    assert encoder.encode(np.zeros(RATE, np.float64)).shape == (50,)
    np.testing.assert_array_equal(encoder.encode(noise(RATE).astype(np.float64)), encoder.encode(noise(RATE)))


def test_semantic_encoder_s_skip_carries_the_relu_as_neucodec_s_in_place_relu_makes_it():
    """neucodec writes `residual_blocks(x) + x` with an in-place ReLU first in
    residual_blocks: by the time `+ x` is read, x is relu(x)."""
    from services.codec_worker.neucodec_encoder import SemanticEncoder

    torch.manual_seed(2)
    module = SemanticEncoder(8)
    x = torch.randn(1, 8, 30)
    in_place = nn.Sequential(nn.ReLU(inplace=True), module.residual_blocks[1], nn.ReLU(inplace=True),
                             module.residual_blocks[3])
    with torch.no_grad():
        h = module.initial_conv(x)
        expected = module.final_conv(in_place(h) + h)
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
        plain = module.final_conv(module.residual_blocks(module.initial_conv(x)) + module.initial_conv(x))
        assert not torch.allclose(module(x), plain)
