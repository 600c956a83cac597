"""The `vlmserve` command. Each subcommand is added by a small `_add_*_parser(subparsers)` function
that sets `func`, the callable run with the parsed arguments."""
from __future__ import annotations

import argparse
import sys


def _add_bench_parser(subparsers) -> None:
    from vlmserve.benchmarks import throughput

    bench = subparsers.add_parser("bench", help="run a benchmark")
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    p = kinds.add_parser("throughput", help="offline throughput, optionally beside HF and vLLM",
                         description=throughput.__doc__,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    throughput.add_cli_args(p)
    p.set_defaults(func=throughput.main)

    from vlmserve.benchmarks import latency

    p = kinds.add_parser("latency", help="latency of one batch: time to first token, decode speed",
                         description=latency.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    latency.add_cli_args(p)
    p.set_defaults(func=latency.main)

    from vlmserve.benchmarks import preprocess

    p = kinds.add_parser("preprocess", help="image preprocessing time per image: vlmserve's Qwen2-VL path "
                         "vs the HF image processor", description=preprocess.__doc__,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preprocess.add_cli_args(p)
    p.set_defaults(func=preprocess.main)

    from vlmserve.benchmarks import serving

    p = kinds.add_parser("serving", help="online serving against an OpenAI-compatible server",
                         description=serving.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serving.add_cli_args(p)
    p.set_defaults(func=serving.main)


def _add_serve_parser(subparsers) -> None:
    try:
        from vlmserve.entrypoints.openai import api_server
    except ImportError as e:  # the server's packages are missing: the benchmarks still run
        why = str(e)  # `e` itself is unbound once the except block ends
        p = subparsers.add_parser("serve", help=f"unavailable here ({why})")
        p.set_defaults(func=lambda args: sys.exit(f"vlmserve serve needs the server's packages: {why}"))
        return

    p = subparsers.add_parser("serve", help="start the OpenAI-compatible server",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    api_server.add_serve_args(p)
    p.set_defaults(func=api_server.run_server)


def build_parser() -> argparse.ArgumentParser:
    from vlmserve.version import __version__

    parser = argparse.ArgumentParser(prog="vlmserve", description="vlmserve: inference and serving of "
                                     "vision-language models")
    parser.add_argument("--version", action="version", version=f"vlmserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
