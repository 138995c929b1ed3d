"""The `ane-eval` command line.

    ane-eval inspect DIR [--json]      what is inside a model directory, with consistency verdicts

`demo` stands for the embedded demo model wherever a model directory is expected.
Bad input gives one line and exit status 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def resolve_model(arg: str) -> Path:
    if arg == "demo":
        from . import demo
        return demo.model_dir()
    return Path(arg)


def cmd_inspect(args) -> int:
    from .card import format_card, model_card

    card = model_card(resolve_model(args.model_dir))
    print(json.dumps(card, indent=2, default=str) if args.json else format_card(card))
    return 0 if card["consistency"]["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ane-eval", description="Evaluate and regression-gate LLMs converted for "
                                     "the Apple Neural Engine (ANEMLL layout), with CoreML or the portable runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="show a model directory's parts, interfaces, metadata and consistency")
    p.add_argument("model_dir", help="ANEMLL model directory, or 'demo' for the embedded demo model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ane-eval: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, NotImplementedError) as e:
        if args.debug:
            raise
        message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        print(f"ane-eval: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
