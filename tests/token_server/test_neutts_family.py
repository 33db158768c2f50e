"""NeuTTS-Air as the second family: its vocabulary read by name, its prompt, and the
token server serving the demo NeuTTS backbone (real llama.cpp, Qwen2 architecture)
with the engine, scheduler and sampler Orpheus uses, unchanged."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import numpy as np
import pytest

from chorus.proto.tts.v1 import common_pb2, token_server_pb2, token_server_pb2_grpc
from chorus.speech import codecs, neutts, orpheus
from chorus.speech.voice_store import VoiceStore
from services.token_server.config import TokenServerConfig
from services.token_server.prompts import NeuTtsPrompts, OrpheusPrompts, PromptError
from services.token_server.server import start_server
from tools.demo_models.neutts_gguf import neutts_vocabulary, write_demo_neutts_backbone

REFERENCE_CODES = [5, 65535, 0, 1234, 42]


@pytest.fixture(scope="module")
def vocabulary():
    return neutts_vocabulary()[0]


@pytest.fixture(scope="module")
def neutts_gguf(tmp_path_factory):
    return write_demo_neutts_backbone(tmp_path_factory.mktemp("neutts") / "backbone.gguf")


@pytest.fixture()
def voice_store(tmp_path):
    store = VoiceStore(tmp_path / "voices")
    store.register("anna", neutts.NAME, "Hello, this is my voice.", np.zeros(16_000, np.float32), 16_000,
                   codes={codecs.NEUCODEC_24KHZ: np.array(REFERENCE_CODES)})
    store.register("tara-snac", "orpheus", "Hi.", np.zeros(16_000, np.float32), 16_000, codes={"snac_24khz": [1, 2]})
    store.register("damaged", neutts.NAME, "Hi.", np.zeros(16_000, np.float32), 16_000,
                   codes={codecs.NEUCODEC_24KHZ: np.array([3, -1])})
    return store


def resolve(tokens: list[str], input_format: str | None = neutts.PHONEMES) -> neutts.NeuTtsVocabulary:
    return neutts.resolve(lambda i: tokens[i], len(tokens), input_format)


def test_the_vocabulary_is_read_by_name_wherever_its_tokens_sit(vocabulary):
    found = resolve(vocabulary)
    family = found.family
    assert family.codes_per_frame == 1 and family.codebook_size == 65_536
    assert vocabulary[family.code_token_id(0, 0)] == "<|speech_0|>"
    assert vocabulary[family.code_token_id(65_535, 0)] == "<|speech_65535|>"
    assert vocabulary[family.end_of_speech] == neutts.SPEECH_GENERATION_END
    assert family.tokens_per_audio_second == 50.0 and family.codec == "neucodec_24khz"
    # Moved by 7 ids (a checkpoint with other added tokens): found all the same.
    shifted = resolve([f"<|pad_{i}|>" for i in range(7)] + vocabulary)
    assert shifted.family.code_token_base == family.code_token_base + 7


def test_a_vocabulary_that_is_not_neutts_or_is_broken_is_named(vocabulary):
    with pytest.raises(neutts.NotNeuTts):
        resolve(["a", "b", "<custom_token_10>"])
    no_end = [t if t != neutts.SPEECH_GENERATION_END else "x" for t in vocabulary]
    with pytest.raises(neutts.VocabularyError, match="no <.SPEECH_GENERATION_END.>"):
        resolve(no_end)
    gap = list(vocabulary)
    i, j = gap.index("<|speech_100|>"), gap.index("<|speech_101|>")
    gap[i], gap[j] = gap[j], gap[i]  # code order broken: a code's slice would read the wrong logits
    with pytest.raises(neutts.VocabularyError, match="consecutive ids"):
        resolve(gap)
    with pytest.raises(neutts.VocabularyError, match="Chorus reads"):
        resolve(vocabulary, "graphemes")


def test_the_prompt_frames_phonemes_or_text_as_neutts_does(vocabulary):
    def tokenize(text: str) -> list[int]:
        return [ord(c) for c in text]

    found = resolve(vocabulary)
    ids = found.specials
    prompt = found.prompt(tokenize, "ref", [3, 4], "new")
    expected = [*tokenize("user: Convert the text to speech:"), ids[neutts.TEXT_PROMPT_START], *tokenize("ref new"),
                ids[neutts.TEXT_PROMPT_END], *tokenize("\nassistant:"), ids[neutts.SPEECH_GENERATION_START],
                found.family.code_token_id(3, 0), found.family.code_token_id(4, 0)]
    assert prompt == expected
    bpe = resolve(vocabulary, neutts.BPE).prompt(tokenize, "ref", [3], "new")
    assert bpe == [ids[neutts.TEXT_PROMPT_START], *tokenize("ref new"), ids[neutts.TEXT_PROMPT_END],
                   ids[neutts.SPEECH_GENERATION_START], found.family.code_token_id(3, 0)]


def test_neutts_prompts_speak_only_registered_neutts_voices(vocabulary, voice_store):
    found = resolve(vocabulary)
    prompts = NeuTtsPrompts(found, voice_store, lambda text: [ord(c) for c in text], str.upper)
    prompt = prompts.build("hi there", "anna")
    assert prompt[-len(REFERENCE_CODES):] == [found.family.code_token_id(c, 0) for c in REFERENCE_CODES]
    assert [ord(c) for c in "HELLO, THIS IS MY VOICE. HI THERE"] == \
        prompt[prompt.index(found.specials[neutts.TEXT_PROMPT_START]) + 1: prompt.index(found.specials[neutts.TEXT_PROMPT_END])]
    for voice, message in [("", "name a voice.*anna"), ("nobody", "no voice named 'nobody'"),
                           ("tara-snac", "registered for orpheus"), ("../etc", "not allowed"),
                           ("damaged", "damaged codes")]:
        with pytest.raises(PromptError, match=message):
            prompts.build("hi", voice)
    with pytest.raises(PromptError, match="no voice store"):
        NeuTtsPrompts(found, None, lambda text: [], str.upper).build("hi", "anna")
    with pytest.raises(PromptError, match="no words"):  # phonemes of nothing speakable
        NeuTtsPrompts(found, voice_store, lambda text: [], lambda text: "").build("...", "anna")
    assert OrpheusPrompts(("tara",), lambda text: [1]).family is orpheus.FAMILY


@contextlib.asynccontextmanager
async def neutts_server(gguf, store, codec_workers=()):
    config = TokenServerConfig(model_path=gguf, slots=2, ctx_per_slot=1024, n_batch=128, llama_threads=2,
                               queue_size=2, realtime_admission=False, calibrate=False, voice_store=store.root,
                               codec_workers=codec_workers)
    running = await start_server(config, port=0)
    channel = grpc.aio.insecure_channel(running.address)
    try:
        yield running, token_server_pb2_grpc.TokenServiceStub(channel)
    finally:
        await channel.close()
        await running.stop(1)


def generate(frames: int, seed: int = 3, voice: str = "anna", codes_only: bool = True):
    sampling = common_pb2.SamplingParams(seed=seed, max_tokens=frames, ignore_end_of_speech=True)
    return token_server_pb2.GenerateRequest(text="Hello there.", voice=voice, sampling=sampling, codes_only=codes_only)


async def codes_of(stub, request) -> tuple[list[common_pb2.CodeFrames], common_pb2.SynthesisSummary]:
    frames, summary = [], None
    async for message in stub.Generate(request):
        if message.WhichOneof("payload") == "frames":
            frames.append(message.frames)
        else:
            summary = message.summary
    return frames, summary


def test_the_token_server_serves_the_demo_neutts_backbone_with_a_registered_voice(neutts_gguf, voice_store):
    async def scenario():
        async with neutts_server(neutts_gguf, voice_store) as (running, stub):
            assert running.components["engine"].family.name == neutts.NAME
            first = await codes_of(stub, generate(60))
            again = await codes_of(stub, generate(60))
            other = await codes_of(stub, generate(60, seed=4))
            refusals = []
            for bad in (generate(5, voice="nobody"), generate(5, voice=""), generate(5, voice="tara-snac")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await codes_of(stub, bad)
                refusals.append((err.value.code(), err.value.details()))
            return first, again, other, refusals

    (frames, summary), again, other, refusals = asyncio.run(scenario())
    # One code a frame, 50 frames a second, every code a NeuCodec code.
    assert [f.first_frame_index for f in frames] == list(range(60))
    assert all(len(f.codes) == 1 and 0 <= f.codes[0] < 65_536 for f in frames)
    assert summary.frames == 60 and summary.tokens == 60
    assert summary.audio_seconds == pytest.approx(60 / 50)
    # The reference's transcript and codes are in the prompt: more than the text alone.
    assert summary.prompt_tokens > len("user: Convert the text to speech:") + len(REFERENCE_CODES)
    assert [f.codes[0] for f in again[0]] == [f.codes[0] for f in frames]  # same seed, same codes
    assert [f.codes[0] for f in other[0]] != [f.codes[0] for f in frames]
    assert [code for code, _ in refusals] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert "no voice named 'nobody'" in refusals[0][1]
    assert "name a voice" in refusals[1][1]
    assert "registered for orpheus" in refusals[2][1]


def test_espeak_ng_phonemizes_as_neutts_reads_it():
    from chorus.speech.phonemes import Phonemizer, PhonemizerError

    phonemize = Phonemizer()
    assert phonemize.version.startswith("1.52")  # the version neutts bundles
    assert phonemize("Hello there, how are you?") == "həlˈoʊ ðˈɛɹ, hˈaʊ ɑːɹ juː?"
    assert phonemize("") == phonemize("   ") == ""
    assert "ˈ" in phonemize("<|speech_5|> a NUL \x00 inside")  # special-token text is just text
    with pytest.raises(PhonemizerError, match="refused language 'xx-nope'"):
        Phonemizer("xx-nope")


@pytest.fixture(scope="module")
def neucodec_dir(tmp_path_factory):
    from tools.demo_models.neucodec_dir import write_demo_neucodec

    return write_demo_neucodec(tmp_path_factory.mktemp("neucodec"), seed=1)


@contextlib.asynccontextmanager
async def neucodec_worker(model_dir, calibrate=False):
    from services.codec_worker.config import CodecWorkerConfig
    from services.codec_worker.server import start_server as start_worker

    config = CodecWorkerConfig(model_dir=model_dir, device="cpu", codec=codecs.NEUCODEC_24KHZ, torch_threads=1,
                               calibrate=calibrate)
    running = await start_worker(config, port=0)
    try:
        yield running
    finally:
        await running.stop(1)


def test_a_neutts_stream_is_decoded_by_a_neucodec_worker_to_the_streaming_decoders_audio(
        neutts_gguf, neucodec_dir, voice_store):
    """The whole second family through the token server and a codec worker: NeuTTS
    codes from llama.cpp, NeuCodec audio from the worker, sample for sample the
    streaming decoder's audio of the same codes, nothing lost (a frame, 480 samples)."""
    from services.codec_worker.neucodec_model import load_neucodec
    from services.codec_worker.neucodec_streaming import StreamingNeuCodec

    async def scenario():
        async with neucodec_worker(neucodec_dir) as worker, neutts_server(neutts_gguf, voice_store,
                                                                         codec_workers=(worker.address,)) as (_, stub):
            frames, _ = await codes_of(stub, generate(70))
            audio, summary = [], None
            async for message in stub.Generate(generate(70, codes_only=False)):
                if message.WhichOneof("payload") == "audio":
                    audio.append(message.audio)
                elif message.WhichOneof("payload") == "summary":
                    summary = message.summary
            return frames, audio, summary

    frames, audio, summary = asyncio.run(scenario())
    codes = [f.codes[0] for f in frames]
    assert [chunk.sample_offset for chunk in audio] == list(np.cumsum([0] + [len(c.pcm) // 2 for c in audio[:-1]]))
    assert {chunk.sample_rate_hz for chunk in audio} == {24_000}
    pcm = np.frombuffer(b"".join(chunk.pcm for chunk in audio), dtype="<i2")
    assert pcm.size == 70 * 480 and summary.audio_seconds == pytest.approx(70 / 50)
    decoder = StreamingNeuCodec(load_neucodec(neucodec_dir))
    expected = np.concatenate([decoder.push(codes), decoder.finish()])
    assert np.array_equal(pcm, np.clip(np.rint(expected * 32767.0), -32768, 32767).astype("<i2"))


def test_a_neucodec_worker_lists_its_codec_refuses_snac_and_measures_its_capacity(neucodec_dir):
    from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc

    async def scenario():
        async with neucodec_worker(neucodec_dir, calibrate=True) as worker:
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = codec_pb2_grpc.CodecServiceStub(channel)
                load = await stub.GetLoad(codec_pb2.GetLoadRequest())
                refusals = []
                for start in (codec_pb2.DecodeStart(codec=codecs.SNAC_24KHZ),
                              codec_pb2.DecodeStart(codec=codecs.NEUCODEC_24KHZ, first_frame_index=3)):
                    call = stub.Decode(iter([codec_pb2.DecodeRequest(start=start)]))
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in call:
                            pass
                    refusals.append((err.value.code(), err.value.details()))
                bad_code = stub.Decode(iter([
                    codec_pb2.DecodeRequest(start=codec_pb2.DecodeStart(codec=codecs.NEUCODEC_24KHZ)),
                    codec_pb2.DecodeRequest(frames=common_pb2.CodeFrames(first_frame_index=0, codes=[65_536])),
                ]))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in bad_code:
                        pass
                refusals.append((err.value.code(), err.value.details()))
                return load, refusals, worker.components["engine"].capacity

    load, refusals, capacity = asyncio.run(scenario())
    assert list(load.codecs) == [codecs.NEUCODEC_24KHZ]
    assert refusals[0][0] == grpc.StatusCode.FAILED_PRECONDITION and "decodes neucodec_24khz" in refusals[0][1]
    assert refusals[1][0] == grpc.StatusCode.INVALID_ARGUMENT and "starts at frame 0" in refusals[1][1]
    assert refusals[2][0] == grpc.StatusCode.INVALID_ARGUMENT and "code 65536 outside 0..65535" in refusals[2][1]
    assert 1 <= capacity.limit  # calibrated on chunk-long steps: some streams, not the slot cap by default


def test_the_code_digest_takes_neucodec_codes_and_keeps_orpheus_digests():
    """Codes above 32767 broke the digest (signed 16-bit words), which ended the
    frame relay: a NeuTTS stream stopped after its first such code. Orpheus's codes
    digest to what they did."""
    import hashlib

    from services.token_server.code_digest import CodeDigest

    before = 0
    frame = (0, 4095, 17, 2048, 1, 4000, 3)
    before = int.from_bytes(hashlib.blake2b(before.to_bytes(8, "little") + np.asarray(frame, "<i2").tobytes(),
                                            digest_size=8).digest(), "little")
    digest = CodeDigest()
    digest.update(frame)
    assert digest.state == before
    digest.update((65_535,))
    assert digest.frames == 2


def test_a_failure_relaying_frames_ends_the_stream_instead_of_stalling_it(neutts_gguf, neucodec_dir, voice_store,
                                                                          monkeypatch):
    from services.token_server import servicer

    def broken(self, codes):
        raise RuntimeError("digest broke")

    monkeypatch.setattr(servicer.CodeDigest, "update", broken)

    async def scenario():
        async with neucodec_worker(neucodec_dir) as worker, neutts_server(neutts_gguf, voice_store,
                                                                         codec_workers=(worker.address,)) as (_, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(generate(30, codes_only=False), timeout=20):
                    pass
            return err.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "relaying frames to the codec worker failed: digest broke" in error.details()


def test_a_neutts_stream_outlives_its_codec_worker_with_the_same_audio(neutts_gguf, neucodec_dir, voice_store):
    """A NeuCodec worker stopped mid-stream: the token server resumes the stream on the
    other worker from frame 0 (the same windows) and relays only the samples it had not,
    so the listener gets the uninterrupted audio, sample for sample."""
    from services.codec_worker.neucodec_model import load_neucodec
    from services.codec_worker.neucodec_streaming import StreamingNeuCodec

    async def scenario():
        async with neucodec_worker(neucodec_dir) as a, neucodec_worker(neucodec_dir) as b:
            async with neutts_server(neutts_gguf, voice_store, codec_workers=(a.address, b.address)) as (_, stub):
                frames, _ = await codes_of(stub, generate(200))
                pcm, stopped = [], None
                async for message in stub.Generate(generate(200, codes_only=False), timeout=60):
                    if message.WhichOneof("payload") != "audio":
                        continue
                    pcm.append(message.audio)
                    if stopped is None:
                        (stopped,) = [w for w in (a, b) if w.components["engine"].open_streams]
                        await stopped.stop(0)
                return frames, pcm, [w for w in (a, b) if w is not stopped][0].components["engine"].stats.frames

    frames, pcm, resumed_frames = asyncio.run(scenario())
    assert [c.sample_offset for c in pcm] == list(np.cumsum([0] + [len(c.pcm) // 2 for c in pcm[:-1]]))
    audio = np.frombuffer(b"".join(c.pcm for c in pcm), dtype="<i2")
    decoder = StreamingNeuCodec(load_neucodec(neucodec_dir))
    codes = [f.codes[0] for f in frames]
    expected = np.concatenate([decoder.push(codes), decoder.finish()])
    assert np.array_equal(audio, np.clip(np.rint(expected * 32767.0), -32768, 32767).astype("<i2"))
    assert resumed_frames == 200  # the other worker decoded the whole stream again, from its first frame


def test_a_neutts_request_samples_as_neutts_does_unless_it_says_otherwise(vocabulary):
    from services.token_server.request_mapping import resolve_sampling
    from services.token_server.sampler import SamplingParams

    family = resolve(vocabulary).family
    resolved = resolve_sampling(common_pb2.SamplingParams(seed=1), family)
    assert (resolved.temperature, resolved.top_k, resolved.top_p, resolved.min_p, resolved.repetition_penalty) == \
        pytest.approx((1.0, 50, 0.95, 0.05, 1.0))
    mine = resolve_sampling(common_pb2.SamplingParams(seed=1, temperature=0.5, top_k=0), family)
    assert (mine.temperature, mine.top_k, mine.top_p) == pytest.approx((0.5, 0, 0.95))
    assert resolve_sampling(common_pb2.SamplingParams(seed=1), orpheus.FAMILY) == SamplingParams(seed=1)


def test_the_worst_a_client_sends_a_neutts_server_fails_only_that_request(neutts_gguf, voice_store):
    """Text at the 20,000-character limit (phonemized off the event loop, then too long
    for a slot), a 100,000-character voice name, NUL and control characters, a budget
    at int32's edge: each is refused or spoken on its own, and the server serves the
    next request as before."""
    def text_request(text: str, voice: str = "anna", max_tokens: int = 20):
        sampling = common_pb2.SamplingParams(seed=1, max_tokens=max_tokens, ignore_end_of_speech=True)
        return token_server_pb2.GenerateRequest(text=text, voice=voice, sampling=sampling, codes_only=True)

    async def scenario():
        async with neutts_server(neutts_gguf, voice_store) as (_, stub):
            outcomes = []
            for request in (text_request("word " * 4000), text_request("Hi.", voice="v" * 100_000),
                            text_request("a\x00b\x01c\x7f and more"), text_request("Hi.", max_tokens=2**31 - 1)):
                try:
                    frames, _ = await codes_of(stub, request)
                    outcomes.append(("OK", len(frames)))
                except grpc.aio.AioRpcError as err:
                    outcomes.append((err.code().name, err.details()))
            after, _ = await codes_of(stub, generate(10))
            return outcomes, len(after)

    outcomes, after = asyncio.run(scenario())
    assert outcomes[0][0] == "INVALID_ARGUMENT" and "too long" in outcomes[0][1]
    assert outcomes[1][0] == "INVALID_ARGUMENT" and len(outcomes[1][1]) < 300  # the name is echoed cut short
    assert outcomes[2] == ("OK", 20)  # NUL and control characters are text like any other
    # A budget past the slot's room is cut to it: a slot of 1,024 positions less the prompt.
    assert outcomes[3][0] == "OK" and 0 < outcomes[3][1] < 1024
    assert after == 10


def test_a_reference_is_encoded_by_the_neutts_servers_codec_worker_to_the_encoders_codes(
        neutts_gguf, neucodec_dir, voice_store):
    """EncodeReference goes token server -> codec worker -> NeuCodec's encoder (real
    modules, demo weights): the codes are those of the encoder run directly."""
    from services.codec_worker.neucodec_encoder import load_neucodec_encoder
    from support.speechlike import speechlike

    samples = speechlike(2.0)

    async def scenario():
        async with neucodec_worker(neucodec_dir) as worker, \
                neutts_server(neutts_gguf, voice_store, codec_workers=(worker.address,)) as (_, stub):
            request = token_server_pb2.EncodeReferenceRequest(
                request_id="ref-1", audio=common_pb2.ReferenceAudio(samples=samples.tolist(), sample_rate_hz=16_000))
            return await stub.EncodeReference(request, timeout=120)

    reply = asyncio.run(scenario())
    expected = load_neucodec_encoder(neucodec_dir).encode(samples)
    assert reply.codes.codec == codecs.NEUCODEC_24KHZ
    assert len(reply.codes.codes) == expected.size >= 100  # 50 a second
    np.testing.assert_array_equal(np.asarray(reply.codes.codes), expected)


def test_a_neucodec_worker_refuses_references_it_cannot_encode_with_the_reason(neucodec_dir, tmp_path):
    """The codec worker checks what reaches its encoder as the gateway does (it is also
    called directly), and a decoder-only directory says it cannot clone."""
    import shutil

    from chorus.proto.tts.v1 import codec_pb2, codec_pb2_grpc
    from support.speechlike import speechlike

    decoder_only = tmp_path / "decoder-only"
    shutil.copytree(neucodec_dir, decoder_only)
    (decoder_only / "encoder.json").unlink()
    good = speechlike(1.5)
    nan = good.copy()
    nan[100] = np.nan
    cases = {
        "nan": (nan, 16_000),
        "rate": (good, 24_000),
        "short": (good[:8000], 16_000),
        "long": (np.zeros(16_000 * 61 // 2, np.float32), 16_000),
        "loud": (good * 4, 16_000),
    }

    async def scenario():
        answers = {}
        async with neucodec_worker(neucodec_dir) as worker, grpc.aio.insecure_channel(worker.address) as channel:
            stub = codec_pb2_grpc.CodecServiceStub(channel)
            for name, (samples, rate) in cases.items():
                request = codec_pb2.EncodeRequest(audio=common_pb2.ReferenceAudio(samples=samples.tolist(),
                                                                                 sample_rate_hz=rate))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Encode(request, timeout=60)
                answers[name] = err.value
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Encode(codec_pb2.EncodeRequest(codec="snac_24khz"), timeout=60)
            answers["snac"] = err.value
            answers["fine"] = await stub.Encode(codec_pb2.EncodeRequest(
                audio=common_pb2.ReferenceAudio(samples=good.tolist(), sample_rate_hz=16_000)), timeout=60)
        async with neucodec_worker(decoder_only) as worker, grpc.aio.insecure_channel(worker.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await codec_pb2_grpc.CodecServiceStub(channel).Encode(codec_pb2.EncodeRequest(
                    audio=common_pb2.ReferenceAudio(samples=good.tolist(), sample_rate_hz=16_000)), timeout=60)
            answers["decoder_only"] = err.value
        return answers

    answers = asyncio.run(scenario())
    for name in cases:
        assert answers[name].code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert "not numbers" in answers["nan"].details() and "16000 Hz" in answers["rate"].details()
    assert "0.50 s long" in answers["short"].details() and "30.50 s long" in answers["long"].details()
    assert "[-1, 1]" in answers["loud"].details()
    assert answers["snac"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(answers["fine"].codes.codes) == 75  # the worker still encodes after every refusal
    assert answers["decoder_only"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no encoder" in answers["decoder_only"].details()


def test_an_orpheus_token_server_clones_no_voice(gguf_path, snac_dir):
    async def scenario():
        config = TokenServerConfig(model_path=gguf_path, slots=1, llama_threads=1, realtime_admission=False,
                                   calibrate=False)
        running = await start_server(config, port=0)
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await token_server_pb2_grpc.TokenServiceStub(channel).EncodeReference(
                        token_server_pb2.EncodeReferenceRequest(), timeout=30)
                return err.value
        finally:
            await running.stop(1)

    err = asyncio.run(scenario())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "fixed voices only" in err.details()
