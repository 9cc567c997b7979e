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
    "clipkd_dino.toyworld.commands",
    "clipkd_dino.concepts.commands",
    "clipkd_dino.teacher.commands",
    "clipkd_dino.train.commands",
    "clipkd_dino.eval.commands",
    "clipkd_dino.export.commands",
    "clipkd_dino.classify.commands",
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
        code = int(args.func(args) or 0)
    except UserError as error:
        print(f"clipkd {args.command}: error: {error}", file=sys.stderr)
        code = 2
    except RunStopped as stop:
        print(f"clipkd {args.command}: {stop}", file=sys.stderr)
        code = stop.code
    except KeyboardInterrupt:
        print(f"clipkd {args.command}: interrupted", file=sys.stderr)
        code = 130
    gc.collect()  # loaders and their worker processes, freed while the interpreter is whole
    from clipkd_dino.engine.distributed import finish_process

    return finish_process(code)


if __name__ == "__main__":
    sys.exit(main())
