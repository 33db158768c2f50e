"""The registered-voice store: whole voices on disk, read by any process, after any restart."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chorus.speech.voice_store import VoiceExists, VoiceNotFound, VoiceStore, VoiceStoreError

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = np.sin(np.arange(16_000 * 2) / 16_000 * 2 * np.pi * 220).astype(np.float32) * 0.5
CODES = {"neucodec_24khz": np.arange(100, dtype=np.int32) * 7}


def register(store: VoiceStore, name: str = "anna", **overrides):
    fields = dict(family="neutts-air", transcript="Hello, this is Anna.", reference=REFERENCE,
                  reference_rate=16_000, codes=CODES)
    return store.register(name, **{**fields, **overrides})


def test_a_voice_reads_back_whole_from_another_process(tmp_path):
    register(VoiceStore(tmp_path))
    # Another process, as another gateway or a restarted one would be: nothing in memory.
    child = ("import sys, json, numpy as np\n"
             "from pathlib import Path\n"
             "from chorus.speech.voice_store import VoiceStore\n"
             f"v = VoiceStore(Path({str(tmp_path)!r})).get('anna')\n"
             "print(json.dumps([v.family, v.transcript, v.reference_rate, float(v.reference.sum()),"
             " {k: c.tolist() for k, c in v.codes.items()}]))\n")
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    family, transcript, rate, total, codes = json.loads(done.stdout)
    assert (family, transcript, rate) == ("neutts-air", "Hello, this is Anna.", 16_000)
    assert total == pytest.approx(float(REFERENCE.sum()))
    assert codes == {k: c.tolist() for k, c in CODES.items()}
    assert VoiceStore(tmp_path).names() == ["anna"]


def test_a_name_is_registered_once_and_can_be_removed_then_reused(tmp_path):
    store = VoiceStore(tmp_path)
    register(store)
    with pytest.raises(VoiceExists, match="'anna' is already registered"):
        register(store, transcript="Another take.")
    assert store.get("anna").transcript == "Hello, this is Anna."
    store.remove("anna")
    with pytest.raises(VoiceNotFound, match="no voice named 'anna'"):
        store.get("anna")
    with pytest.raises(VoiceNotFound):
        store.remove("anna")
    register(store, transcript="Another take.")
    assert store.get("anna").transcript == "Another take."
    assert [p.name for p in tmp_path.iterdir()] == ["anna"]  # no half-written or removed folders left


def _race(root: str, transcript: str, barrier, results) -> None:
    barrier.wait()
    try:
        register(VoiceStore(Path(root)), transcript=transcript)
        results.put(("won", transcript))
    except VoiceExists:
        results.put(("lost", transcript))


def test_two_processes_registering_one_name_leave_exactly_one_whole_voice(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    racers = [context.Process(target=_race, args=(str(tmp_path), f"Take {i}.", barrier, results)) for i in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in racers)
    winners = [t for kind, t in outcomes if kind == "won"]
    assert len(winners) == 1 and [kind for kind, _ in outcomes].count("lost") == 3
    assert VoiceStore(tmp_path).get("anna").transcript == winners[0]
    assert [p.name for p in tmp_path.iterdir()] == ["anna"]


@pytest.mark.parametrize(("name", "transcript", "message"), [
    ("Anna", "Hi.", "not allowed"),
    ("../etc", "Hi.", "not allowed"),
    ("", "Hi.", "not allowed"),
    ("a" * 65, "Hi.", "not allowed"),
    ("a" * 100_000, "Hi.", "not allowed"),
    ("anna", "   ", "transcript is empty"),
    ("anna", "x" * 2001, "at most 2000"),
    ("anna", "Hi\x00there.", "control characters"),
])
def test_bad_names_and_transcripts_are_refused_and_write_nothing(tmp_path, name, transcript, message):
    store = VoiceStore(tmp_path)
    with pytest.raises(VoiceStoreError, match=message) as err:
        register(store, name, transcript=transcript)
    assert len(str(err.value)) < 300  # what was sent is echoed cut short
    assert store.names() == [] and not any(tmp_path.iterdir())


def test_a_tampered_voice_is_an_error_that_names_it_and_runs_nothing(tmp_path):
    store = VoiceStore(tmp_path)
    register(store)
    # A pickled object array where the reference was: np.load without pickle refuses it.
    np.save(tmp_path / "anna" / "reference.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(VoiceStoreError, match="voice 'anna' cannot be read"):
        store.get("anna")
    (tmp_path / "anna" / "voice.json").write_text("{not json")
    with pytest.raises(VoiceStoreError, match="voice 'anna' cannot be read"):
        store.get("anna")


def test_the_family_and_the_codes_are_read_without_the_reference(tmp_path):
    """What the gateway (the family, per request) and a token server's prompt (the
    transcript and codes) read; a damaged description is an error naming the voice."""
    store = VoiceStore(tmp_path)
    store.register("anna", "neutts-air", "Hello.", np.ones(16_000, np.float32), 16_000,
                   codes={"neucodec_24khz": np.arange(5)})
    assert store.family_of("anna") == "neutts-air"
    light = store.get("anna", with_reference=False)
    assert light.reference.size == 0 and light.transcript == "Hello."
    assert np.array_equal(light.codes["neucodec_24khz"], np.arange(5))
    assert store.get("anna").reference.size == 16_000
    with pytest.raises(VoiceNotFound):
        store.family_of("nobody")
    (tmp_path / "anna" / "voice.json").write_text("[1, 2]")
    for read in (store.family_of, store.get):
        with pytest.raises(VoiceStoreError, match="voice 'anna' cannot be read"):
            read("anna")
