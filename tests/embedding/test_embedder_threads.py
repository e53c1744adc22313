"""The embedder is called from several threads at once: counting on request threads while
a batch encodes on the worker thread. Neither may disturb the other."""

from __future__ import annotations

import threading

import numpy as np

TEXTS = [("word " * n).strip() for n in (3, 200, 17, 90, 1, 150, 40, 250)]


def test_token_counts_match_the_model_tokenizer(minilm):
    reference = minilm._model.tokenizer(TEXTS, add_special_tokens=True, truncation=False, verbose=False)
    assert minilm.count_tokens(TEXTS) == [len(ids) for ids in reference["input_ids"]]


def test_counting_while_encoding_in_other_threads_breaks_nothing(minilm):
    expected_vectors = minilm.embed(TEXTS)
    expected_counts = minilm.count_tokens(TEXTS)
    errors: list[BaseException] = []
    stop = threading.Event()

    def count() -> None:
        try:
            while not stop.is_set():
                assert minilm.count_tokens(TEXTS[::-1]) == expected_counts[::-1]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    counters = [threading.Thread(target=count) for _ in range(3)]
    for t in counters:
        t.start()
    try:
        for _ in range(6):  # padded batches of mixed lengths, encoded while others count
            vectors = minilm.embed(TEXTS)
            cos = np.sum(vectors * expected_vectors, axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected_vectors, axis=1)
            )
            assert cos.min() >= 0.9999
    finally:
        stop.set()
        for t in counters:
            t.join()
    assert not errors, errors[0]
