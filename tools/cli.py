"""The `chorus` command: one entry point, one module per subcommand.

Each subcommand names a `module:function` that adds its parser to the subparsers
and sets `func` to what runs it. Modules are imported only for the subcommand being
run, so that `chorus say` does not pay for torch or llama.cpp imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> ("module:register function", one-line help)
SUBCOMMANDS = {
    "models": ("tools.demo_models.cli:register", "build demo models"),
    "serve": ("tools.serve:register", "start the whole stack locally"),
    "say": ("tools.client:register_say", "synthesize text through a gateway"),
    "voices": ("tools.client:register_voices", "list the gateway's voices; clone one from a recording (--add), delete one"),
    "bench": ("tools.bench.command:register", "load sweep through a gateway: real-time streams, TTFA, stalls"),
    "doctor": ("tools.doctor:register", "what a bug report needs: CPU, builds, models, a one-step decode"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="chorus", description="Chorus streaming TTS")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (target, help_text) in SUBCOMMANDS.items():
        if name != wanted:
            subparsers.add_parser(name, help=help_text)
            continue
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(subparsers, name, help_text)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
