"""Hybrid-search quality bench: nDCG@10 and recall@100 of dense, keyword and every fusion.

    python -m perf.quality_bench                         # the MS MARCO subset beside the repo
    python -m perf.quality_bench --data DIR --out q.json --md q.md
    python -m perf.quality_bench --freshness             # + the keyword-after-write latency line

Rankings are computed in-process once, then fusion is swept offline:

* dense: the bundled MiniLM (sentence-transformers, as the quality test's reference),
  exact cosine top-``candidates`` over the corpus;
* keyword: ``retrieval.keyword.KeywordIndex`` (the collection's BM25), stemmed and not;
* fusion: ``retrieval.fusion.fuse`` of the two candidate lists (``candidates`` each, as a
  hybrid search takes them), for RRF, convex min-max and convex z-score, at the
  defaults and over a sweep of the dense weight (0 = keyword only, 1 = dense only).

The corpus is BEIR-format (``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv``); any
labelled set in that format can be passed with ``--data`` (a check that the default holds
beyond the set it was chosen on). ``--cache`` keeps the embeddings between runs.
``--freshness`` times a keyword search on an unchanged collection of the corpus against one
issued right after an upsert (alternating rounds, in-process ``Collection``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from retrieval.fusion import DEFAULT_DENSE_WEIGHT, DEFAULT_RRF_K, Fusion, FusionDefaults, fuse
from retrieval.ir_metrics import ndcg_at_k, recall_at_k
from retrieval.keyword import KeywordIndex

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "msmarco"
WEIGHTS = [round(0.05 * i, 2) for i in range(21)]


def load(data: Path) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """Corpus, queries (those with judgements) and graded qrels of a BEIR directory."""
    def read(name: str) -> list[dict]:
        with open(data / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(data / "qrels" / "test.tsv", encoding="utf-8") as f:
        for line in f:
            qid, did, grade = line.rstrip("\n").split("\t")[:3]
            if grade.lstrip("-").isdigit():  # skips the header
                qrels[qid][did] = int(grade)
    queries = [q for q in read("queries.jsonl") if q["_id"] in qrels]
    return read("corpus.jsonl"), queries, dict(qrels)


def passage(doc: dict) -> str:
    """The indexed text of a BEIR document (title and text, as BEIR evaluates)."""
    return f"{doc['title']}. {doc['text']}" if doc.get("title") else doc["text"]


def embed(corpus: list[dict], queries: list[dict], cache: Path | None):
    """L2-normalised (docs, queries) vectors of the bundled MiniLM (cached when asked)."""
    if cache is not None and cache.exists():
        saved = np.load(cache)
        if saved["docs"].shape[0] == len(corpus) and saved["queries"].shape[0] == len(queries):
            return saved["docs"], saved["queries"]
    from sentence_transformers import SentenceTransformer

    from server.engines.embedder import bundled_model_path

    model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
    docs = model.encode([passage(d) for d in corpus], batch_size=64, normalize_embeddings=True)
    qv = model.encode([q["text"] for q in queries], batch_size=64, normalize_embeddings=True)
    if cache is not None:
        np.savez(cache, docs=docs, queries=qv)
    return docs, qv


def dense_rankings(docs: np.ndarray, qv: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, exact cosine top-k (rows, scores), stable ties."""
    scores = qv @ docs.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [(top[i].astype(np.int64), scores[i, top[i]].astype(np.float32)) for i in range(len(qv))]


def keyword_rankings(corpus, queries, k: int, stem: bool):
    """Per query, BM25 top-k (rows, scores) of the collection's keyword index."""
    index = KeywordIndex(stem=stem)
    index.sync([passage(d) for d in corpus], np.ones(len(corpus), dtype=bool))
    return index.search([q["text"] for q in queries], k)


def per_query(rankings, corpus, queries, qrels) -> tuple[np.ndarray, np.ndarray]:
    """Per-query nDCG@10 and recall@100 of row rankings."""
    ndcg, recall = [], []
    for (rows, _), q in zip(rankings, queries, strict=True):
        ids = [corpus[r]["_id"] for r in rows.tolist()]
        ndcg.append(ndcg_at_k(ids, qrels[q["_id"]], 10))
        recall.append(recall_at_k(ids, qrels[q["_id"]], 100))
    return np.asarray(ndcg), np.asarray(recall)


def evaluate(rankings, corpus, queries, qrels) -> dict[str, float]:
    """Mean nDCG@10 and recall@100 of per-query row rankings."""
    ndcg, recall = per_query(rankings, corpus, queries, qrels)
    return {"ndcg@10": float(ndcg.mean()), "recall@100": float(recall.mean())}


def paired(candidate: np.ndarray, baseline: np.ndarray, samples: int = 2000) -> dict[str, float]:
    """Per-query comparison: wins, losses, mean delta and the bootstrap share of query
    resamples in which the candidate's mean is at least the baseline's."""
    delta = candidate - baseline
    rng = np.random.default_rng(0)
    means = delta[rng.integers(0, delta.size, size=(samples, delta.size))].mean(axis=1)
    return {
        "wins": int((delta > 1e-9).sum()), "losses": int((delta < -1e-9).sum()),
        "mean_delta": float(delta.mean()), "p_not_worse": float((means >= 0).mean()),
    }


def fused(dense, keyword, method: Fusion, weight: float, top: int):
    """Per query, the fused ranking."""
    return [
        fuse(d, kw, method, weight, DEFAULT_RRF_K, top) for d, kw in zip(dense, keyword, strict=True)
    ]


def freshness(corpus: list[dict], rounds: int) -> dict[str, float]:
    """Median ms of a keyword search on an unchanged collection vs right after an upsert."""
    from retrieval.collection import Collection
    from retrieval.manager import CollectionManager
    from retrieval.types import Payload, Point, SearchMode, SearchQuery, make_spec

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        manager = CollectionManager(tmp, durable=False)
        manager.load()
        coll: Collection = manager.create(make_spec("fresh", 8))
        vec = lambda: rng.standard_normal(8).astype(np.float32)  # noqa: E731
        for start in range(0, len(corpus), 1000):
            coll.upsert([Point(d["_id"], vec(), Payload(passage(d))) for d in corpus[start : start + 1000]])
        query = SearchQuery(k=10, text="what is the temperature scale", mode=SearchMode.KEYWORD)
        coll.search([query])  # builds the index once
        unchanged, after_write = [], []
        for i in range(rounds):  # alternating rounds
            began = time.perf_counter()
            coll.search([query])
            unchanged.append(time.perf_counter() - began)
            coll.upsert([Point(f"new-{i}", vec(), Payload(f"zebra{i} temperature scale"))])
            began = time.perf_counter()
            hits = coll.search([SearchQuery(k=1, text=f"zebra{i}", mode=SearchMode.KEYWORD)])[0]
            after_write.append(time.perf_counter() - began)
            assert hits and hits[0].id == f"new-{i}", "the new point is not found"
        manager.close()
    u, a = float(np.median(unchanged)) * 1e3, float(np.median(after_write)) * 1e3
    return {"unchanged_ms_p50": u, "after_upsert_ms_p50": a, "ratio": a / u, "rounds": rounds}


def main() -> None:
    """Run the bench and print/write the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=None, help="npz file for the embeddings")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--md", type=Path, default=None, help="markdown table")
    ap.add_argument("--freshness", action="store_true")
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()

    corpus, queries, qrels = load(args.data)
    docs, qv = embed(corpus, queries, args.cache)
    k = args.candidates
    dense = dense_rankings(docs, qv, k)
    keyword = {stem: keyword_rankings(corpus, queries, k, stem) for stem in (True, False)}
    rows: dict[str, dict[str, float]] = {
        "dense": evaluate(dense, corpus, queries, qrels),
        "keyword (stemmed)": evaluate(keyword[True], corpus, queries, qrels),
        "keyword (no stemmer)": evaluate(keyword[False], corpus, queries, qrels),
    }
    defaults = FusionDefaults()
    for method in Fusion:
        weight = defaults.weight_for(method)
        rows[f"hybrid {method.value} w={weight}"] = evaluate(
            fused(dense, keyword[True], method, weight, k), corpus, queries, qrels
        )
    sweep = {
        method.value: {
            str(w): evaluate(fused(dense, keyword[True], method, w, k), corpus, queries, qrels)["ndcg@10"]
            for w in WEIGHTS
        }
        for method in Fusion
    }
    dense_q = per_query(dense, corpus, queries, qrels)[0]
    robustness = {
        method.value: {
            str(w): paired(per_query(fused(dense, keyword[True], method, w, k), corpus, queries, qrels)[0], dense_q)
            for w in (0.5, 0.6, 0.7, 0.8, 0.9)
        }
        for method in Fusion
    }
    result = {
        "data": args.data.name, "queries": len(queries), "passages": len(corpus),
        "candidates": k, "default": {"method": defaults.method.value, "dense_weight": DEFAULT_DENSE_WEIGHT},
        "rankings": rows, "sweep_ndcg@10": sweep, "vs_dense_ndcg@10": robustness,
    }
    if args.freshness:
        result["freshness"] = freshness(corpus, args.rounds)
    lines = [
        f"Quality on {args.data.name} ({len(queries)} judged queries, {len(corpus)} passages)", "",
        "| ranking | nDCG@10 | recall@100 |", "|---|---|---|",
        *(f"| {name} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} |" for name, m in rows.items()),
        "", "nDCG@10 over the dense weight (stemmed BM25):", "",
        "| dense weight | " + " | ".join(m.value for m in Fusion) + " |",
        "|---" * (len(Fusion) + 1) + "|",
        *(f"| {w} | " + " | ".join(f"{sweep[m.value][str(w)]:.4f}" for m in Fusion) + " |" for w in WEIGHTS),
    ]
    lines += ["", "Per query against dense (nDCG@10): wins/losses, mean delta, bootstrap P(not worse):", "",
              "| method | " + " | ".join(f"w={w}" for w in (0.5, 0.6, 0.7, 0.8, 0.9)) + " |",
              "|---" * 6 + "|"]
    for method in Fusion:
        cells = [robustness[method.value][str(w)] for w in (0.5, 0.6, 0.7, 0.8, 0.9)]
        lines.append(f"| {method.value} | " + " | ".join(
            f"{c['wins']}/{c['losses']}, {c['mean_delta']:+.4f}, {c['p_not_worse']:.2f}" for c in cells) + " |")
    if args.freshness:
        f = result["freshness"]
        lines += ["", f"keyword search, {len(corpus)} passages: unchanged p50 {f['unchanged_ms_p50']:.2f} ms, "
                  f"right after an upsert p50 {f['after_upsert_ms_p50']:.2f} ms (ratio {f['ratio']:.2f}, "
                  f"{f['rounds']} alternating rounds)"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
