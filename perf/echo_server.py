"""The raw gRPC echo server: the floor every hop's latency and throughput is compared to.

Two unary methods, registered through ``grpc.method_handlers_generic_handler`` without
serializers, so the handlers receive and return the raw request bytes: no protobuf work,
no model, only what grpc.aio on uvloop costs.

- ``/perf.Echo/Echo`` answers at once: the floor of any call.
- ``/perf.Echo/Hold`` answers after holding for the time its request's first 8 bytes give
  (little-endian float64 seconds; see ``hold_request``) on a worker thread, as a hop
  awaits its model work off the event loop: the floor of a call whose work takes that
  long, with none of the hop's own code.

It also serves ``grpc.health.v1`` so the bench can wait for it the same way it waits for
the backbone.

Run as ``python -m perf.echo_server --port N`` (0 picks a free port); once listening it
prints the bound port, alone on one line, to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ECHO_SERVICE = "perf.Echo"
ECHO_METHOD_NAME = "Echo"
#: Full method path clients call.
ECHO_METHOD = f"/{ECHO_SERVICE}/{ECHO_METHOD_NAME}"
#: Full path of the method that holds each call on a worker thread before answering.
HOLD_METHOD = f"/{ECHO_SERVICE}/Hold"
_HOLD = struct.Struct("<d")


def hold_request(seconds: float, payload: bytes = b"") -> bytes:
    """A ``Hold`` request: hold for ``seconds`` (0 <= s <= 60), then echo the bytes."""
    return _HOLD.pack(seconds) + payload


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Return the request bytes unchanged."""
    return request


async def _hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Sleep on a worker thread for the request's hold time, then return the request."""
    if len(request) < _HOLD.size:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hold: request starts with a float64 of seconds")
    (seconds,) = _HOLD.unpack_from(request)
    if not 0.0 <= seconds <= 60.0:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hold: seconds must be within [0, 60]")
    await asyncio.to_thread(time.sleep, seconds)
    return request


def echo_handler() -> grpc.GenericRpcHandler:
    """The generic handler for ``/perf.Echo/Echo`` and ``/perf.Echo/Hold`` (bytes in, same
    bytes out)."""
    # No request_deserializer / response_serializer: grpc passes bytes through untouched.
    methods = {
        ECHO_METHOD_NAME: grpc.unary_unary_rpc_method_handler(_echo),
        "Hold": grpc.unary_unary_rpc_method_handler(_hold),
    }
    return grpc.method_handlers_generic_handler(ECHO_SERVICE, methods)


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start an echo server (with health SERVING) on the running loop; returns it and its port."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((echo_handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    for service in ("", ECHO_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def _serve(host: str, port: int) -> None:
    server, bound = await start_echo_server(host, port)
    print(bound, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m perf.echo_server``."""
    parser = argparse.ArgumentParser(prog="python -m perf.echo_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
