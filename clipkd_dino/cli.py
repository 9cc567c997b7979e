"""The `clipkd` command: a thin dispatcher over the library.

Each subcommand lives next to the code it drives, in a `commands.py` module that only imports argparse at import
time (so `clipkd --help` stays fast) and registers itself with `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from clipkd_dino import __version__
from clipkd_dino.errors import RunStopped, UserError

COMMAND_MODULES = (
    "clipkd_dino.data.commands",
    "clipkd_dino.concepts.commands",
    "clipkd_dino.teacher.commands",
    "clipkd_dino.train.commands",
    "clipkd_dino.eval.commands",
    "clipkd_dino.export",
    "clipkd_dino.cls.commands",
    "clipkd_dino.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkd", description="Distil CLIP models (CLIP-KD + KD++ dino-loss).")
    parser.add_argument("--version", action="version", version=f"clipkd-dino {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except UserError as error:
        print(f"clipkd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stop:
        print(f"clipkd {args.command}: {stop}", file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:
        print(f"clipkd {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        # Free what reference cycles still hold (a trainer's process group among it) while the interpreter is
        # whole: gloo objects destroyed during interpreter shutdown can abort the process (SIGABRT, "terminate
        # called without an active exception"), seen rarely at the end of 2-process runs.
        gc.collect()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
