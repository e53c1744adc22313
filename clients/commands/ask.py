"""``backbone ask "question" --collection NAME``: a retrieval-augmented answer, streamed.

The answer (which cites its sources as [1]..[n]) is written to stdout as its tokens
arrive, then the numbered sources (id, scores, the start of the text). ``--stats`` adds,
on stderr, every hop's timing, whether the semantic cache answered, what the deadline
budget degraded and the model that ran (the tier ``--model auto`` chose). Ctrl-C cancels
the stream, which stops the generation on the server.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from clients.commands._common import (
    EXIT_FAILED,
    EXIT_OK,
    add_client_options,
    handles_errors,
    open_client,
    positive_int,
)
from clients.generation import Delta
from clients.pipeline import AnswerFinal, Source, Sources

#: Characters of each source's text shown after the answer.
SNIPPET_CHARS = 100
SAMPLING_FLAGS = ("max_tokens", "temperature", "seed")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ask`` subcommand."""
    parser = subparsers.add_parser(
        "ask",
        help="answer a question from a collection (retrieve, rerank, generate), streamed",
        description='Answer a question from the passages of a collection; "-" reads it '
                    "from stdin.",
    )
    parser.add_argument("question", help='the question, or "-" for stdin')
    parser.add_argument("--collection", required=True, help="collection to retrieve from")
    parser.add_argument("--model", default="", help='model name or "auto" (default: the server\'s)')
    parser.add_argument("--top-n", type=positive_int, default=0, metavar="N",
                        help="sources given to the model (default: the server's, 5)")
    parser.add_argument("--candidates", type=positive_int, default=0, metavar="K",
                        help="search candidates before rerank (default: the server's, 50)")
    parser.add_argument("--mode", choices=("dense", "keyword", "hybrid"), default=None,
                        help="search mode (default: dense)")
    parser.add_argument("--skip-rerank", action="store_true", help="keep the search order")
    parser.add_argument("--no-cache", action="store_true", help="skip the semantic cache")
    parser.add_argument("--system", default="", help="system prompt (default: the server's)")
    parser.add_argument("--max-tokens", type=positive_int, default=None, metavar="N")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 (or unset with the server default) makes answers cacheable")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stats", action="store_true",
                        help="print timings, cache hit, degradations and the model to stderr")
    add_client_options(parser)
    parser.set_defaults(func=handles_errors(run))


def format_source(number: int, source: Source) -> str:
    """``[n] id (search 0.83, rerank 4.12): the start of the text...``."""
    text = " ".join(source.text.split())
    if len(text) > SNIPPET_CHARS:
        text = text[: SNIPPET_CHARS - 3] + "..."
    scores = f"search {source.search_score:.3f}"
    if source.rerank_score:
        scores += f", rerank {source.rerank_score:.3f}"
    return f"[{number}] {source.id} ({scores}): {text}"


def format_stats(final: AnswerFinal) -> list[str]:
    """The ``--stats`` lines."""
    hops = " ".join(f"{t.hop}={t.total_us / 1000:.1f}ms" for t in final.timings)
    return [
        f"[{final.finish_reason or '?'}] model={final.model} cache_hit={str(final.cache_hit).lower()} "
        f"sources_used={final.sources_used} prompt_tokens={final.usage.prompt_tokens} "
        f"completion_tokens={final.usage.completion_tokens}",
        f"timings: {hops}",
        "degradations: " + (", ".join(final.degradations) or "none"),
    ]


def write_sources(out: TextIO, sources: tuple[Source, ...]) -> None:
    """The numbered sources, as the model was told to cite them."""
    if not sources:
        out.write("\n(no sources found)\n")
        return
    out.write("\nSources:\n")
    for number, source in enumerate(sources, 1):
        out.write(format_source(number, source) + "\n")


def run(args: argparse.Namespace) -> int:
    """Stream the answer, then print the sources (and the stats)."""
    out = sys.stdout
    question = sys.stdin.read() if args.question == "-" else args.question
    sampling = {f: getattr(args, f) for f in SAMPLING_FLAGS if getattr(args, f) is not None}
    sources: tuple[Source, ...] = ()
    final: AnswerFinal | None = None
    with open_client(args) as client:
        try:
            stream = client.pipeline.answer(
                question, args.collection, model=args.model, top_n=args.top_n,
                search_top_k=args.candidates, mode=args.mode, skip_rerank=args.skip_rerank,
                skip_cache=args.no_cache, system_prompt=args.system, timeout=args.timeout,
                **sampling,
            )
            with stream:
                for event in stream:
                    if isinstance(event, Delta):
                        out.write(event.text)
                        out.flush()
                    elif isinstance(event, Sources):
                        sources = event.sources
                    else:
                        final = event
        except KeyboardInterrupt:
            out.write("\n")
            print("backbone ask: cancelled", file=sys.stderr)
            return EXIT_FAILED
    out.write("\n")
    write_sources(out, sources[: final.sources_used] if final is not None else sources)
    out.flush()
    if final is not None and args.stats:
        for line in format_stats(final):
            print(line, file=sys.stderr)
    return EXIT_OK if final is not None else EXIT_FAILED
