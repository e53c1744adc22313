"""``backbone generate PROMPT``: stream a completion to stdout as tokens arrive.

The prompt is sent as one user chat message (rendered with the model's chat template)
unless ``--raw`` sends it as a raw prompt. A summary (finish reason, tokens, time to
first token) goes to stderr with ``--stats``. Ctrl-C cancels the stream, which aborts
the generation on the server.
"""

from __future__ import annotations

import argparse
import sys

from backbone.v1 import generation_service_pb2 as pb
from backbone.v1 import generation_service_pb2_grpc
from clients.channel import call_kwargs
from clients.commands._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_client_options,
    handles_errors,
    open_client,
    positive_int,
)
from clients.errors import iterate

FINISH_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    parser = subparsers.add_parser(
        "generate",
        help="stream a completion for a prompt",
        description='Generate text; the prompt "-" reads it from stdin.',
    )
    parser.add_argument("prompt", help='the prompt, or "-" for stdin')
    parser.add_argument("--model", default="", help="model name (default: the server's)")
    parser.add_argument("--raw", action="store_true", help="send a raw prompt, no chat template")
    parser.add_argument("--system", default="", help="a system message (chat mode)")
    parser.add_argument("--max-tokens", type=positive_int, default=None, metavar="N")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stats", action="store_true", help="print a summary to stderr")
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    """The GenerateRequest the command line describes."""
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = pb.SamplingParams(stop=args.stop)
    for field in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(sampling, field, value)
    request = pb.GenerateRequest(model=args.model, sampling=sampling)
    if args.raw:
        request.prompt = text
    else:
        if args.system:
            request.messages.add(role="system", content=args.system)
        request.messages.add(role="user", content=text)
    return request


def run(args: argparse.Namespace) -> int:
    """Stream the completion; each delta is written and flushed as it arrives."""
    request = build_request(args)
    out = sys.stdout
    with open_client(args) as client:
        stub = generation_service_pb2_grpc.GenerationServiceStub(client.channel)
        # --timeout bounds the whole stream; unset, the client's stream deadline applies.
        kwargs = call_kwargs(client.options, args.timeout, stream=True)
        final = None
        try:
            for message in iterate(stub.Generate(request, **kwargs)):
                if message.HasField("delta"):
                    out.write(message.delta.text)
                    out.flush()
                else:
                    final = message.final
        except KeyboardInterrupt:
            out.write("\n")
            print("backbone generate: cancelled", file=sys.stderr)
            return EXIT_FAILED
        out.write("\n")
        out.flush()
    if final is not None and args.stats:
        print(
            f"[{FINISH_NAMES.get(final.finish_reason, '?')}] model={final.model} "
            f"prompt_tokens={final.usage.prompt_tokens} "
            f"completion_tokens={final.usage.completion_tokens} "
            f"ttft_ms={final.time_to_first_token_us / 1000:.1f} "
            f"tpot_ms={final.time_per_output_token_us / 1000:.1f}",
            file=sys.stderr,
        )
    return EXIT_OK if final is not None else EXIT_FAILED
