"""`python -m benchmarks NAME`: one subcommand per benchmark module (see `benchmarks/__init__.py`)."""

import argparse
import sys

import benchmarks
from benchmarks import RAW, add_subcommand, checkpoint, convert, data, gpu, precision, say, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__, formatter_class=RAW)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (convert, data, train, checkpoint, precision, gpu):
        add_subcommand(sub, module)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "logs").mkdir(exist_ok=True)
    say(f"logs in {args.workdir / 'logs'}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
