"""Train the complexity scorer's weights from the train split of a labelled prompt file.

Writes ``router/data/route_weights.json`` (or ``--out``): three logistic models,

- ``features_only``: over the explainable features of :mod:`router.complexity`;
- ``embedding``: over the bundled all-MiniLM-L6-v2 embedding (L2-normalised), computed
  in-process with sentence-transformers (the ONNX engine the embedding hop runs gives the
  same vectors: it checks that at load);
- ``full``: over the features plus the embedding model's logit, stacked. The logit it is
  trained on is out-of-fold (5-fold cross-validation), so the stack does not learn to
  trust an embedding model that has seen the very prompt.

Only rows with ``split == "train"`` are read; ``perf/route_eval.py`` judges the test
split. Deterministic (fixed folds, liblinear).

    python -m perf.route_train [--prompts FILE] [--out FILE] [-C 1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from router.complexity import (
    DEFAULT_PROMPTS,
    DEFAULT_WEIGHTS,
    EMBEDDING_FEATURE,
    FEATURES,
    extract_features,
    read_prompts,
)

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def feature_matrix(rows: list[dict]) -> np.ndarray:
    """(n, len(FEATURES)) features of the rows."""
    out = []
    for row in rows:
        f = extract_features(row["text"], int(row.get("turns", 1)))
        out.append([f[name] for name in FEATURES])
    return np.asarray(out, dtype=np.float64)


def embed(texts: list[str]) -> np.ndarray:
    """Normalised MiniLM vectors of ``texts``, in-process."""
    from sentence_transformers import SentenceTransformer

    from server.engines.embedder import bundled_model_path

    model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
    return model.encode(texts, batch_size=32, normalize_embeddings=True)


def labels(rows: list[dict]) -> np.ndarray:
    """1 for complex, 0 for simple."""
    return np.asarray([1 if r["label"] == "complex" else 0 for r in rows])


def _model(c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="liblinear", max_iter=1000)


def train(rows: list[dict], vectors: np.ndarray, c: float) -> dict:
    """The weights document for ``rows`` (train split) and their embeddings."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x, y = feature_matrix(rows), labels(rows)
    features_only = _model(c).fit(x, y)
    emb = _model(c).fit(vectors, y)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    oof = cross_val_predict(_model(c), vectors, y, cv=folds, method="decision_function")
    stacked = _model(c).fit(np.column_stack([x, oof]), y)
    full_names = (*FEATURES, EMBEDDING_FEATURE)
    return {
        "version": 1,
        "trained_on": "route_prompts.jsonl, split=train",
        "train_rows": len(rows),
        "C": c,
        "features_only": {
            "bias": float(features_only.intercept_[0]),
            "weights": {n: round(float(w), 6) for n, w in zip(FEATURES, features_only.coef_[0])},
        },
        "full": {
            "bias": float(stacked.intercept_[0]),
            "weights": {n: round(float(w), 6) for n, w in zip(full_names, stacked.coef_[0])},
        },
        "embedding": {
            "model": EMBEDDING_MODEL,
            "bias": float(emb.intercept_[0]),
            "coef": [round(float(w), 6) for w in emb.coef_[0]],
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Train on the train split and write the weights file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("-C", type=float, default=1.0, help="inverse L2 regularisation")
    args = parser.parse_args(argv)
    rows = [r for r in read_prompts(args.prompts) if r["split"] == "train"]
    doc = train(rows, embed([r["text"] for r in rows]), args.C)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out} from {len(rows)} train rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
