"""Voice names that other APIs' clients send, mapped to this gateway's voices.

A program written for OpenAI asks for "alloy", one written for Riva for
"English-US.Female-1": each gets a configured voice of a similar kind, so the
program speaks unchanged. A name the gateway itself lists always means that voice;
an alias whose target is not configured is not offered.
"""

from __future__ import annotations

import re

from gateway.config import ORPHEUS_VOICES, GatewayConfig

# OpenAI's voices to Orpheus's, by the voice's character as OpenAI describes it.
OPENAI_VOICES = {
    "alloy": "tara",
    "ash": "leo",
    "ballad": "dan",
    "coral": "leah",
    "echo": "zac",
    "fable": "jess",
    "nova": "mia",
    "onyx": "leo",
    "sage": "zoe",
    "shimmer": "jess",
    "verse": "zac",
    "marin": "tara",
    "cedar": "dan",
}

# Riva names voices "<Language>.<Female|Male>-<n>" (older releases: "English-US-Female-1");
# the n-th female or male Orpheus voice answers to them.
_RIVA_NAME = re.compile(r"^(?P<language>[A-Za-z]+-[A-Za-z]+)[.-](?P<kind>female|male)-(?P<n>[1-9][0-9]*)$", re.I)
RIVA_LANGUAGE = "English-US"


def _of_kind(config: GatewayConfig, kind: str) -> list[str]:
    return [v for v in config.voices if ORPHEUS_VOICES.get(v, "").split(",")[0] == kind]


def riva_voice_names(config: GatewayConfig) -> list[tuple[str, str]]:
    """(Riva name, voice) for every configured Orpheus voice, as GetRivaSynthesisConfig lists them."""
    names = []
    for kind in ("female", "male"):
        for n, voice in enumerate(_of_kind(config, kind), start=1):
            names.append((f"{RIVA_LANGUAGE}.{kind.capitalize()}-{n}", voice))
    return names


def resolve(name: str, config: GatewayConfig) -> str:
    """The configured voice `name` stands for; `name` itself when it is no known alias
    (validation then names the voices there are)."""
    if not name or name in config.voices:
        return name
    lowered = name.lower()
    target = OPENAI_VOICES.get(lowered)
    if target is not None and target in config.voices:
        return target
    match = _RIVA_NAME.match(name)
    if match and match["language"].lower() == RIVA_LANGUAGE.lower():
        voices = _of_kind(config, match["kind"].lower())
        n = int(match["n"])
        if n <= len(voices):
            return voices[n - 1]
    return name


def aliases(config: GatewayConfig) -> dict[str, str]:
    """Every alias a client may send, with the voice it resolves to here."""
    table = {alias: voice for alias, voice in OPENAI_VOICES.items() if voice in config.voices}
    table.update(riva_voice_names(config))
    return table
