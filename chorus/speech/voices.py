"""The voices a deployment speaks, for every service that checks them.

A voice is only a prompt prefix ("tara: ..."), so a fine-tune with other speakers
lists its own (--voices [CHORUS_VOICES] on the gateway and the token server). The
token server checks the name as the gateway does: called directly, it would
otherwise put whatever string a caller sends in front of the text it speaks.
"""

from __future__ import annotations

import re

# Orpheus's English speakers, the default (tara) first.
ORPHEUS_VOICES = {
    "tara": "female, conversational, clear",
    "leah": "female, warm",
    "jess": "female, lively",
    "leo": "male, steady",
    "dan": "male, relaxed",
    "mia": "female, soft",
    "zac": "male, upbeat",
    "zoe": "female, bright",
}

# What a speaker's name looks like in a fine-tune's prompts: one word.
_VOICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

VOICES_FLAG_HELP = "comma-separated voice names, the default first (default: Orpheus's) [CHORUS_VOICES]"


def parse_voices(flag: str) -> tuple[str, ...]:
    """The names of a --voices value, in order; Orpheus's when it names none."""
    names = tuple(v.strip() for v in flag.split(",") if v.strip())
    return names or tuple(ORPHEUS_VOICES)


def voice_problems(voices: tuple[str, ...]) -> list[str]:
    """What is wrong with a configured voice list, one sentence each."""
    problems = []
    if not voices:
        problems.append("at least one voice is needed")
    bad = [v for v in voices if not _VOICE_NAME.fullmatch(v)]
    if bad:
        problems.append(f"voice names must be one word of letters, digits, '-' or '_' (up to 64): {bad}")
    if len(set(voices)) != len(voices):
        problems.append(f"voice names repeat: {', '.join(voices)}")
    return problems


def unknown_voice(voice: str, voices: tuple[str, ...]) -> str | None:
    """The message for a voice outside `voices`, None when it is one of them."""
    if voice in voices:
        return None
    shown = voice if len(voice) <= 64 else voice[:64] + "..."
    return f"unknown voice {shown!r}; this service speaks {', '.join(voices)} (see ListVoices)"


def description(voice: str) -> str:
    return ORPHEUS_VOICES.get(voice, "")
