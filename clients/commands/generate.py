"""``backbone generate PROMPT``: stream a completion to stdout as tokens arrive.

The prompt is sent as one user chat message (rendered with the model's chat template)
unless ``--raw`` sends it as a raw prompt. A summary (finish reason, tokens, time to
first token) goes to stderr with ``--stats``. Ctrl-C cancels the stream, which aborts
the generation on the server.
"""

from __future__ import annotations

import argparse
import json
import sys

from clients.commands._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_client_options,
    handles_errors,
    open_client,
    positive_int,
)
from clients.generation import Delta, Final, GenerationClient, GenerationStream, Message

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


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


def start_stream(generation: GenerationClient, args: argparse.Namespace) -> GenerationStream:
    """Start the generation the command line describes."""
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = {f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None}
    messages = None
    if not args.raw:
        messages = [Message("system", args.system)] if args.system else []
        messages.append(Message("user", text))
    return generation.generate(
        text if args.raw else None, messages=messages, model=args.model,
        # --timeout bounds the whole stream; unset, the client's stream deadline applies.
        timeout=args.timeout, stop=args.stop, **sampling,
    )


ROUTE_METADATA = "backbone-route"


def route_summary(route: str | bytes | None) -> str:
    """`` tier=... score=...`` from a ``backbone-route`` trailer (model="auto"), else ""."""
    if not route:
        return ""
    try:
        decision = json.loads(route)
    except ValueError:
        return ""
    score = decision.get("score")
    text = f" tier={decision.get('tier') or '-'}"
    if isinstance(score, (int, float)):
        text += f" score={score:.2f}"
    return text + (" spilled" if decision.get("spilled") else "")


def run(args: argparse.Namespace) -> int:
    """Stream the completion; each delta is written and flushed as it arrives."""
    out = sys.stdout
    with open_client(args) as client:
        final: Final | None = None
        try:
            with start_stream(client.generation, args) as stream:
                for event in stream:
                    if isinstance(event, Delta):
                        out.write(event.text)
                        out.flush()
                    else:
                        final = event
                route = dict(stream.trailing_metadata()).get(ROUTE_METADATA) if final else None
        except KeyboardInterrupt:
            out.write("\n")
            print("backbone generate: cancelled", file=sys.stderr)
            return EXIT_FAILED
        out.write("\n")
        out.flush()
    if final is not None and args.stats:
        print(
            f"[{final.finish_reason or '?'}] model={final.model} "
            f"prompt_tokens={final.usage.prompt_tokens} "
            f"completion_tokens={final.usage.completion_tokens} "
            f"ttft_ms={final.time_to_first_token_s * 1000:.1f} "
            f"tpot_ms={final.time_per_output_token_s * 1000:.1f}"
            + route_summary(route),
            file=sys.stderr,
        )
    return EXIT_OK if final is not None else EXIT_FAILED
