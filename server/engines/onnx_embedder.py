"""ONNX Runtime engine for sentence-transformers models: the embedding hop's default on CPU.

Why (measured here, 2 CPU cores, all-MiniLM-L6-v2 on MS MARCO passages; perf/embed_baseline
reports it each run):
- torch through ``SentenceTransformer.encode`` does at best ~55-60 texts/s, and only with
  length-sorted batches of 8-64 texts; one text alone takes ~21 ms (~40 texts/s);
- ONNX Runtime running the same exported graph does one text in ~12 ms on both cores
  (~70 texts/s) and ~88 texts/s as two lanes of one thread each, one text per call;
- batching makes ONNX Runtime slower on this CPU (one thread: ~44 texts/s a text at a time,
  ~41 in length-sorted batches of 4, ~33 of 16).

So every text runs on its own (never padded), on one of ``lanes`` lanes (this class's
``lanes = 0``: one per core, each with cores / lanes threads; the hop's configured default
is 1) that the batcher keeps busy in parallel
(``batch_limit`` = 1); a lone text on an idle engine runs on every core instead
(``embed_alone``), which is what a single caller waits for. ``lanes = 1`` runs every text
on every core, one at a time: less throughput, lower latency under load.

The model's transformer is exported to ONNX at load (``torch.onnx``, in memory, a few
seconds; nothing is written to disk); tokenisation, truncation, mean pooling and
normalisation follow the model's sentence-transformers pipeline, and at load the engine's
vectors of probe texts (one longer than the model reads) are checked against
``SentenceTransformer.encode``: below ``CHECK_COSINE`` it refuses to start and the hop falls
back to the torch engine. Pipelines other than Transformer + mean Pooling + Normalize are
refused the same way. CPU only: on a GPU use the torch engine (``embedding.engine``).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from server.engines.embedder import (
    EmbedderBase,
    TokenCounter,
    load_sentence_transformer,
    mean_pooled_pipeline,
    private_tokenizer,
)

if TYPE_CHECKING:
    from server.config import EmbeddingConfig

log = logging.getLogger(__name__)

# The engine's vectors of the probe texts must match SentenceTransformer.encode this well.
CHECK_COSINE = 0.99999
_PROBES = (
    "probe",
    "A longer probe, so that texts of different lengths are compared with the reference.",
    "An over-long probe that the model must cut at its maximum sequence length. " * 40,
)
# Graph inputs the exporter knows how to feed, in this order.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def export_onnx(auto_model: object, input_names: Sequence[str]) -> bytes:
    """The Hugging Face encoder as an ONNX graph (inputs ``input_ids``... with dynamic batch
    and length; output the last hidden state), exported in memory."""
    import torch

    names = list(input_names)

    class _LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = auto_model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.encoder(**dict(zip(names, inputs, strict=True)))[0]

    # Two rows, one padded, so the traced graph keeps the general masking path.
    example = {
        "input_ids": torch.tensor([[101, 2023, 2003, 102], [101, 2023, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "token_type_ids": torch.zeros((2, 4), dtype=torch.long),
    }
    buffer = io.BytesIO()
    module = _LastHidden().eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter of the exporter
        torch.onnx.export(
            module, tuple(example[n] for n in names), buffer,
            input_names=names, output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
            opset_version=17, dynamo=False,
        )
    return buffer.getvalue()


def _session(graph: bytes, threads: int) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # A multi-thread session's workers spin after a call by default; a spinning worker
    # takes a core from the lanes that start when load arrives (measured at 3x overload:
    # ~50 vs ~52 texts/s and admitted p99 ~80 vs ~67 ms; fewer refusals at half load).
    # With one lane it takes the core from the event loop instead (64 callers: 42 vs 51
    # texts/s, p99 80 vs 71 ms), though a lone text runs ~1.5 ms faster spinning.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class Tokens(NamedTuple):
    """A text's model inputs, tokenised: ids (1, n) and, when the model reads them, token
    type ids (1, n), int64."""

    ids: np.ndarray
    type_ids: np.ndarray | None


class OnnxEmbedder(EmbedderBase):
    """An Embedder running a sentence-transformers model's transformer in ONNX Runtime."""

    #: Texts per engine call that the batcher should form at most: each text runs alone.
    batch_limit = 1
    #: A lone text runs on every core (``embed_alone``) while no lane runs.
    runs_alone = True

    @classmethod
    def unavailable_reason(cls, settings: EmbeddingConfig | None) -> str | None:
        """The engine is CPU only."""
        if settings is not None and settings.device != "cpu":
            return f"the ONNX engine is CPU only, not {settings.device!r}"
        return None

    @classmethod
    def from_config(cls, cfg: EmbeddingConfig) -> OnnxEmbedder:
        """The engine for an ``[embedding]`` section (registry entry "onnx")."""
        return cls(cfg.model_path or None, name=cfg.model_name, lanes=cfg.lanes)

    def __init__(
        self, model_path: str | Path | None = None, *, name: str = "", lanes: int = 0
    ) -> None:
        path, model = load_sentence_transformer(model_path)
        self.model_path = str(path)
        self.name = name or path.name
        if not mean_pooled_pipeline(model):
            raise ValueError(
                f"{self.name}: the ONNX engine runs Transformer + mean Pooling (+ Normalize)"
                " pipelines only"
            )
        self.dimension = int(model.get_embedding_dimension())
        self.max_seq_length = int(model.max_seq_length)
        self._normalize = len(list(model)) > 2  # the modules after pooling are Normalize
        self._count = TokenCounter(model)
        # Configured once, so the lanes may encode with it at once.
        self._tokenizer = private_tokenizer(model, truncate_at=self.max_seq_length)
        accepted = set(model.tokenizer.model_input_names)
        self._inputs = [n for n in _INPUTS if n == "input_ids" or n in accepted]
        graph = export_onnx(model[0].auto_model, self._inputs)
        cores = available_cores()
        #: Engine calls that may run at once (the batcher's lanes).
        self.lanes = max(1, int(lanes) or cores)
        # One session shared by the lanes (Run is thread-safe), with the cores shared among
        # them: one lane per core computes on its caller's (the lane's) thread alone.
        lane_threads = max(1, cores // self.lanes)
        self._lane_session = _session(graph, lane_threads)
        self._alone_session = (
            _session(graph, cores) if cores > lane_threads else self._lane_session
        )
        self._check(model)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with special tokens, before truncation."""
        return self._count(texts)

    def prepare(self, texts: Sequence[str]) -> tuple[list[Tokens | str], list[int]]:
        """Each text's token ids (what ``embed`` accepts in its place) and token count,
        from one tokenisation. A text over ``max_seq_length`` stays a text: the lane's
        tokenizer cuts it as the model's pipeline does."""
        inputs: list[Tokens | str] = []
        counts: list[int] = []
        for text in texts:
            encoding = self._count.encode(text)
            counts.append(len(encoding.ids))
            inputs.append(
                text if len(encoding.ids) > self.max_seq_length else self._tokens(encoding)
            )
        return inputs, counts

    def embed(self, texts: Sequence[str | Tokens]) -> np.ndarray:
        """Vectors of ``texts`` (or their ``prepare``d tokens), a text per call, on the
        calling lane's share of the cores."""
        return self._embed(self._lane_session, texts)

    def embed_alone(self, texts: Sequence[str | Tokens]) -> np.ndarray:
        """Vectors of ``texts`` on every core: for a lone text while no lane runs."""
        return self._embed(self._alone_session, texts)

    def _tokens(self, encoding: object) -> Tokens:
        ids = np.asarray([encoding.ids], dtype=np.int64)  # type: ignore[attr-defined]
        types = (
            np.asarray([encoding.type_ids], dtype=np.int64)  # type: ignore[attr-defined]
            if "token_type_ids" in self._inputs else None
        )
        return Tokens(ids, types)

    def _embed(self, session: object, texts: Sequence[str | Tokens]) -> np.ndarray:
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            tokens = (
                self._tokens(self._tokenizer.encode(text, add_special_tokens=True))
                if isinstance(text, str) else text
            )
            feeds = {"input_ids": tokens.ids}
            if "attention_mask" in self._inputs:
                feeds["attention_mask"] = np.ones_like(tokens.ids)
            if tokens.type_ids is not None:
                feeds["token_type_ids"] = tokens.type_ids
            hidden = session.run(None, feeds)[0][0]  # type: ignore[attr-defined]
            vector = hidden.mean(axis=0, dtype=np.float32)
            if self._normalize:
                vector /= max(float(np.linalg.norm(vector)), 1e-12)
            out[row] = vector
        return out

    def _check(self, model: object) -> None:
        """The engine's vectors equal SentenceTransformer.encode on the probes, or raise."""
        reference = np.asarray(model.encode(  # type: ignore[attr-defined]
            list(_PROBES), convert_to_numpy=True, show_progress_bar=False
        ), dtype=np.float32)
        for label, vectors in (
            ("lane", self.embed(_PROBES)), ("alone", self.embed_alone(_PROBES))
        ):
            cosine = np.sum(vectors * reference, axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
            )
            if float(cosine.min()) < CHECK_COSINE:
                raise RuntimeError(
                    f"{self.name}: ONNX {label} vectors differ from sentence-transformers "
                    f"(cosine {float(cosine.min()):.6f} < {CHECK_COSINE})"
                )
