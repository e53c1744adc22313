"""Process entry: ``backbone serve [SERVICE ...]`` (also ``python -m server.main serve``).

With no service named, the embedded default runs every hop in one process on one port.
Configuration: defaults < ``--config`` TOML < ``BACKBONE_<SECTION>__<KEY>`` environment <
flags (``--host``, ``--port``, ``--set section.key=value``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys

import uvloop

from server.app import HOP_FACTORIES, BackboneServer, hops_for
from server.config import (
    Config,
    ConfigError,
    load_config,
    parse_assignment,
    redacted,
    router_upstreams,
)

log = logging.getLogger("backbone")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``serve``, shared by the console script and ``python -m server.main``."""
    parser.add_argument(
        "services", nargs="*", metavar="SERVICE",
        help=f"hops to serve ({', '.join(sorted(HOP_FACTORIES))}); default: server.services",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 50051; 0 picks one)")
    parser.add_argument(
        "--upstream", action="append", default=[], metavar="SERVICE=ADDR[,ADDR...]",
        help="router: replicas of one service (embedding, search, rerank, generation): "
             "host:port, dns:///name:port; repeatable; replaces that service's "
             "[router.upstreams] entry",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set embedding.max_batch_size=32",
    )


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    """The effective config: file < environment < flags."""
    overrides: dict[str, dict[str, str]] = {}
    for text in args.set:
        section, key, value = parse_assignment(text)
        overrides.setdefault(section, {})[key] = value
    if args.host is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = str(args.port)
    config = load_config(args.config, os.environ if environ is None else environ, overrides)
    flags: dict[str, list[str]] = {}
    for text in getattr(args, "upstream", None) or ():
        service, sep, addresses = text.partition("=")
        if not sep or not addresses.strip():
            raise ConfigError(f"--upstream wants SERVICE=ADDR[,ADDR...], got {text!r}")
        flags.setdefault(service.strip(), []).extend(a for a in addresses.split(",") if a.strip())
    if flags:
        upstreams = {**router_upstreams(config.router), **flags}
        router = dataclasses.replace(config.router, upstreams=upstreams)
        router_upstreams(router)  # unknown service names fail here
        config = dataclasses.replace(config, router=router)
    return config


async def run(config: Config, services: list[str]) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    if config.server.metrics_port:
        from server.metrics import serve_http

        serve_http(config.server.metrics_port, config.server.host)
    server = BackboneServer(config, hops_for(services))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        log.error("start-up failed: %s", starting.exception(), exc_info=starting.exception())
        await server.stop(grace=0)
        return 1
    if not starting.done():
        starting.cancel()
    else:
        log.info("ready on %s (services: %s)", server.address, ", ".join(services))
        print(f"backbone serving on {server.address}", flush=True)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, %.1fs grace", config.server.grace_seconds)
    await server.stop()
    return 0


def serve(args: argparse.Namespace) -> int:
    """Run the server for parsed ``serve`` arguments."""
    try:
        config = config_from_args(args)
    except (ConfigError, OSError) as exc:
        print(f"backbone serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    services = args.services or [s.strip() for s in config.server.services.split(",") if s.strip()]
    unknown = [s for s in services if s not in HOP_FACTORIES]
    if unknown:
        print(f"backbone serve: unknown service(s) {unknown}", file=sys.stderr)
        return 2
    log.info("effective config: %s", json.dumps(redacted(config), sort_keys=True))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run(config, services))


def main(argv: list[str] | None = None) -> int:
    """``python -m server.main serve ...``."""
    parser = argparse.ArgumentParser(prog="python -m server.main")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve", help="run the server"))
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
