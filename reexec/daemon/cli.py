"""`reexecd`: the command line."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

# trio_asyncio must be imported before grpclib (grpclib caches the event loop policy).
import trio_asyncio  # noqa: F401

from reexec import __version__
from reexec.daemon.config import ConfigError, check_processes_role, load_config
from reexec.daemon.logs import setup_logging

if TYPE_CHECKING:
    from reexec.daemon.config import Config
    from reexec.daemon.supervisor import ChildFailed


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (default: the embedded all-in-one config)")
    p.add_argument("--data-dir", help="override data_dir")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reexecd", description="Remote build execution (REAPI v2) daemon"
    )
    p.add_argument("--version", action="version", version=f"reexecd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="all in one: CAS, action cache, scheduler and a local worker"
    )
    scheduler = sub.add_parser("scheduler", help="CAS, action cache and scheduler; no worker")
    storage = sub.add_parser(
        "storage", help="a storage node: CAS, ByteStream, action cache, Capabilities only"
    )
    for s in (serve, scheduler, storage):
        _common(s)
        s.add_argument(
            "--listen", action="append", help="override server.listen (host:port; repeatable)"
        )
    worker = sub.add_parser("worker", help="a worker for a remote scheduler")
    _common(worker)
    worker.add_argument(
        "--scheduler",
        action="append",
        help="override worker.scheduler (grpc://HOST:PORT; repeat for several, in order)",
    )
    worker.add_argument("--worker-id", help="override worker.worker_id")
    status = sub.add_parser("status", help="show a running daemon's state (its status socket)")
    drain = sub.add_parser("drain", help="drain a worker (via the scheduler) or this daemon")
    for s in (status, drain):
        s.add_argument("--config", help="config file (to find the default socket)")
        s.add_argument("--data-dir", help="override data_dir (the socket lives there)")
        s.add_argument("--socket", help="status socket path (default: <data-dir>/reexecd.sock)")
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    target = drain.add_mutually_exclusive_group(required=True)
    target.add_argument("worker_id", nargs="?", help="a worker connected to this scheduler")
    target.add_argument("--self", action="store_true", dest="self_", help="drain this daemon")
    check = sub.add_parser(
        "check-config", help="validate a config file and print the effective configuration"
    )
    check.add_argument("config", nargs="?", help="TOML config file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command in ("serve", "scheduler"):
            check_processes_role(config, args.command)
    except ConfigError as e:
        print(f"reexecd: {e}", file=sys.stderr)
        return 2
    if args.command in ("status", "drain"):
        from reexec.daemon.status_cli import drain_command, status_command

        if args.data_dir:
            config.data_dir = args.data_dir
        if args.command == "status":
            return status_command(config, args.socket, args.json)
        return drain_command(config, args.socket, None if args.self_ else args.worker_id)
    if args.command == "check-config":
        import msgspec

        # The effective configuration, defaults filled in (JSON: TOML encoding needs tomli_w).
        print(msgspec.json.format(msgspec.json.encode(config)).decode())
        return 0
    if args.data_dir:
        config.data_dir = args.data_dir
    if getattr(args, "listen", None):
        config.server.listen = args.listen
    if getattr(args, "scheduler", None):
        schedulers = args.scheduler
        config.worker.scheduler = schedulers[0] if len(schedulers) == 1 else schedulers
    if getattr(args, "worker_id", None):
        config.worker.worker_id = args.worker_id
    if args.log_level:
        config.log.level = args.log_level
    if args.log_format:
        config.log.format = args.log_format
    setup_logging(config.log.level, config.log.format)
    from reexec.daemon import tuning

    tuning.apply()
    from reexec.daemon.app import run_daemon
    from reexec.daemon.worker_role import run_worker

    if args.command == "worker":
        main_fn = partial(run_worker, config, args.config)
    elif args.command == "storage":
        # No scheduler (so no worker either), whatever the file says.
        config.scheduler.enabled = False
        main_fn = partial(
            run_daemon, config, local_worker=False, config_path=args.config, role="storage"
        )
        own_argv = sys.argv[1:] if argv is None else argv
        main_fn = _supervised(config, main_fn, own_argv, args.config)
    else:
        main_fn = partial(
            run_daemon, config, local_worker=args.command == "serve", config_path=args.config
        )
        if args.command == "scheduler":
            # Several processes only with shared state (check_processes_role said so above).
            own_argv = sys.argv[1:] if argv is None else argv
            main_fn = _supervised(config, main_fn, own_argv, args.config)
    try:
        trio.run(main_fn)
    except BaseException as e:
        # A start-up error raised inside the nursery tree arrives wrapped in exception groups.
        cause = _start_up_error(e)
        if cause is None:
            raise
        print(f"reexecd: {cause}", file=sys.stderr)
        return 2 if isinstance(cause, ConfigError) else 1
    return 0


def _supervised(config: Config, main_fn: Any, argv: list[str], config_path: str | None) -> Any:
    """With `server.processes > 1`: the supervisor of N copies of this command, or one of
    those copies (reexec/daemon/supervisor.py); otherwise `main_fn` unchanged."""
    from reexec.cas.fs_shared import ProcessShare
    from reexec.daemon.supervisor import as_child, run_supervisor

    share = ProcessShare.from_environment()
    if share is not None:
        as_child(config, share)
        return main_fn
    if config.server.processes > 1:
        return partial(run_supervisor, config, argv, config_path)
    return main_fn


def _start_up_error(e: BaseException) -> ConfigError | OSError | ChildFailed | None:
    """The configuration, OS or supervised-start error behind `e`, if that is all it is."""
    from reexec.daemon.supervisor import ChildFailed

    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e if isinstance(e, ConfigError | OSError | ChildFailed) else None
