"""`reexecd`: the command line."""

from __future__ import annotations

import argparse
import sys

import trio

# trio_asyncio must be imported before grpclib (grpclib caches the event loop policy).
import trio_asyncio  # noqa: F401

from reexec import __version__
from reexec.daemon.config import ConfigError, load_config
from reexec.daemon.logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reexecd", description="Remote build execution (REAPI v2) daemon"
    )
    p.add_argument("--version", action="version", version=f"reexecd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run CAS, action cache and (later) scheduler and worker in one process"
    )
    serve.add_argument(
        "--config", help="TOML config file (default: the embedded all-in-one config)"
    )
    serve.add_argument("--data-dir", help="override data_dir")
    serve.add_argument(
        "--listen", action="append", help="override server.listen (host:port; repeatable)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"])
    check = sub.add_parser(
        "check-config", help="validate a config file and print the effective configuration"
    )
    check.add_argument("config", nargs="?", help="TOML config file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"reexecd: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        import msgspec

        # The effective configuration, defaults filled in (JSON: TOML encoding needs tomli_w).
        print(msgspec.json.format(msgspec.json.encode(config)).decode())
        return 0
    if args.data_dir:
        config.data_dir = args.data_dir
    if args.listen:
        config.server.listen = args.listen
    if args.log_level:
        config.log.level = args.log_level
    if args.log_format:
        config.log.format = args.log_format
    setup_logging(config.log.level, config.log.format)
    from reexec.daemon.app import run_daemon

    try:
        trio.run(run_daemon, config)
    except OSError as e:
        print(f"reexecd: {e}", file=sys.stderr)
        return 1
    return 0
