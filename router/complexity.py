"""How hard a prompt is: a score in [0, 1] and the features behind it.

Two parts, one logistic model each, both trained offline (``perf/route_train.py``) on the
train split of ``router/data/route_prompts.jsonl``; their weights are data
(``router/data/route_weights.json``), not code:

- **features** (:func:`extract_features`): explainable, regex-and-count cues on the text -
  approximate length in tokens, code, math, multi-step reasoning, comparison and design
  cues, numbers, number of questions, conversation depth. Each lies in [0, 1]. No model
  call; well under a millisecond (``perf/route_eval.py`` measures its p99).
- **learned**: a logistic model over the bundled all-MiniLM-L6-v2 embedding of the last
  user turn, stacked as one more input (its logit, called ``embedding``) of a second
  feature model. The caller brings the vector (the generation hop asks the in-process
  embedding hop); with no vector the features-only model answers.

``score = sigmoid(bias + sum(weight_i * feature_i))``; a feature's *contribution* is
``weight_i * feature_i`` in logit units, so the explanation sums to the decision.

No grpc, no server imports: pure policy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
#: The bundled weights file.
DEFAULT_WEIGHTS = DATA_DIR / "route_weights.json"
#: The bundled labelled prompts (train / test split in each record).
DEFAULT_PROMPTS = DATA_DIR / "route_prompts.jsonl"

#: Only the first SCAN_HEAD and the last SCAN_TAIL characters are scanned for cues (the
#: ask is usually at the start or the end; bounds the cost of huge prompts to well under a
#: millisecond; the length feature still sees the whole text).
SCAN_HEAD = 600
SCAN_TAIL = 300
#: Approximate characters per token (English, BPE tokenizers): length without a tokenizer.
CHARS_PER_TOKEN = 4.0
#: Tokens at which the length feature saturates (log scale below it).
LENGTH_SATURATION_TOKENS = 400
#: The code feature at or above which the prompt's task is detected as "code".
CODE_TASK_THRESHOLD = 0.5


def _cues(*patterns: str) -> re.Pattern[str]:
    # Case-sensitive over lower-cased text: faster than re.IGNORECASE.
    return re.compile("|".join(f"(?:{p})" for p in patterns))


# Strong code cues count 1 each, weak ones 0.5; the feature is min(1, total / 2).
_CODE_STRONG = _cues(
    r"```",
    r"\bdef \w+\(",
    r"\bclass \w+[:(]",
    r"\bfunction\s*\w*\(",
    r"#include\b",
    r"\bimport \w+",
    r"=>",
    r"\w+\([^)]*\)\s*\{",
    r"\b(?:write|implement|code|refactor|debug|fix)\b[^.?!\n]{0,40}\b(?:function|class|"
    r"script|program|method|query|regex|code|endpoint|parser|module|unit tests?)\b",
    r"\b(?:python|javascript|typescript|java|c\+\+|c#|rust|golang|go|sql|bash|haskell|"
    r"kotlin|ruby|php)\b[^.?!\n]{0,30}\b(?:function|code|script|program|class|query)\b",
    r"\b(?:segfault|stack trace|traceback|null pointer|compile error|syntax error)\b",
)
_CODE_WEAK = _cues(
    r"\b(?:python|javascript|typescript|rust|golang|sql|regex|bash|api|json|html|css)\b",
    r"\b(?:algorithm|recursion|recursive|linked list|hash ?map|binary tree|array|pointer)\b",
    r"[{};]\s*$",
    r"\b\w+_\w+\b",
)
_MATH = _cues(
    r"\b(?:prove|proof|theorem|lemma|integral|integrate|derivative|differentiate|equation|"
    r"solve|probability|expected value|matrix|eigen\w*|polynomial|irrational|prime|"
    r"factori[sz]e|modulo|inequality|limit of|converge\w*|combinatori\w*|permutations?|"
    r"sqrt|square root|logarithm|geometric|arithmetic sequence|percent(?:age)?|ratio)\b",
    r"\b(?:how many|how much|how long|how far|what fraction)\b",
    r"\d+\s*[-+*/^=<>]\s*\d+",
    r"[=^√∑∫π]",
)
_MULTI_STEP = _cues(
    r"\bstep[- ]by[- ]step\b",
    r"\bwalk me through\b",
    r"\bexplain (?:why|how|in detail)\b",
    r"\b(?:derive|justify|analy[sz]e|evaluate|critique|reason about|break down|outline|"
    r"plan|estimate|diagnose|investigate|prioriti[sz]e)\b",
    r"\b(?:first|then|after that|finally|next)\b",
    r"\b(?:if|suppose|assume|given that)\b[^.?!]{0,80}\b(?:then|what|how|would)\b",
    r"\bwhat would happen\b",
)
_COMPARISON = _cues(
    r"\bcompar\w*\b",
    r"\b(?:versus|vs\.?)\b",
    r"\bdifferences? between\b",
    r"\bpros and cons\b",
    r"\btrade-?offs?\b",
    r"\b(?:better|worse|faster|slower|cheaper) than\b",
    r"\bwhich (?:is|one|should)\b",
    r"\b(?:advantages|disadvantages|contrast)\b",
    r"\bwhen (?:should|would) (?:i|you) (?:use|choose|pick)\b",
)
_DESIGN = _cues(
    r"\b(?:design|architect\w*|scalab\w*|schema|blueprint|roadmap|strategy|proposal|"
    r"propose|migrat\w*|optimi[sz]\w*|fault[- ]toleran\w*|high availability|"
    r"throughput|latency|distributed|microservices?|pipeline|framework)\b",
    r"\b(?:build|create|set up) (?:a|an) (?:system|service|platform|app\w*|backend)\b",
    r"\bhow (?:would|should|could) (?:i|we|you)\b",
)
_NUMBER = re.compile(r"\b\d+(?:[.,]\d+)?\b")


#: Feature names, in the order the weights file lists them.
FEATURES: tuple[str, ...] = (
    "length",
    "code",
    "math",
    "multi_step",
    "comparison",
    "design",
    "numbers",
    "questions",
    "depth",
)
#: The stacked learned input's name in explanations.
EMBEDDING_FEATURE = "embedding"


def approx_tokens(text: str) -> int:
    """Tokens of ``text`` estimated from its length (no tokenizer)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _count(pattern: re.Pattern[str], text: str) -> int:
    return sum(1 for _ in pattern.finditer(text))


def extract_features(text: str, turns: int = 1) -> dict[str, float]:
    """Every feature of :data:`FEATURES` in [0, 1] for the last user turn ``text`` of a
    conversation of ``turns`` user/assistant messages."""
    scan = text if len(text) <= SCAN_HEAD + SCAN_TAIL else (
        text[:SCAN_HEAD] + "\n" + text[-SCAN_TAIL:])
    scan = scan.lower()
    tokens = approx_tokens(text)
    code = _count(_CODE_STRONG, scan) + 0.5 * _count(_CODE_WEAK, scan)
    return {
        "length": min(1.0, math.log1p(tokens) / math.log1p(LENGTH_SATURATION_TOKENS)),
        "code": min(1.0, code / 2.0),
        "math": min(1.0, _count(_MATH, scan) / 2.0),
        "multi_step": min(1.0, _count(_MULTI_STEP, scan) / 2.0),
        "comparison": min(1.0, _count(_COMPARISON, scan) / 2.0),
        "design": min(1.0, _count(_DESIGN, scan) / 2.0),
        "numbers": min(1.0, len(_NUMBER.findall(scan)) / 4.0),
        "questions": min(1.0, scan.count("?") / 3.0),
        "depth": min(1.0, max(0, turns - 1) / 6.0),
    }


def detect_task(features: Mapping[str, float]) -> str | None:
    """The task type the features show ("code"), or None."""
    return "code" if features.get("code", 0.0) >= CODE_TASK_THRESHOLD else None


@dataclass(frozen=True)
class LogisticModel:
    """``sigmoid(bias + sum(weights[name] * x[name]))`` over named inputs."""

    bias: float
    weights: Mapping[str, float]

    def contributions(self, inputs: Mapping[str, float]) -> dict[str, float]:
        """Each input's weight times its value (logit units)."""
        return {name: w * inputs.get(name, 0.0) for name, w in self.weights.items()}


@dataclass(frozen=True)
class EmbeddingModel:
    """A logistic model over an L2-normalised sentence embedding."""

    model: str
    bias: float
    coef: tuple[float, ...]

    def logit(self, vector: Sequence[float]) -> float:
        """``bias + coef . vector``; the vector must have ``len(coef)`` components."""
        if len(vector) != len(self.coef):
            raise ValueError(f"embedding has {len(vector)} dimensions, weights {len(self.coef)}")
        return self.bias + math.fsum(c * float(v) for c, v in zip(self.coef, vector))


@dataclass(frozen=True)
class ScorerWeights:
    """The contents of a weights file."""

    features_only: LogisticModel
    full: LogisticModel
    embedding: EmbeddingModel | None
    meta: Mapping[str, object] = field(default_factory=dict)


def _logistic(doc: Mapping[str, object], where: str) -> LogisticModel:
    try:
        weights = {str(k): float(v) for k, v in dict(doc["weights"]).items()}
        return LogisticModel(float(doc["bias"]), weights)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"routing weights: bad {where} model: {exc}") from exc


def load_weights(path: str | Path | None = None) -> ScorerWeights:
    """Read a weights file (default: the bundled one); ValueError when malformed."""
    path = Path(path) if path else DEFAULT_WEIGHTS
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"routing weights {path}: {exc}") from exc
    features_only = _logistic(doc.get("features_only", {}), "features_only")
    full = _logistic(doc.get("full", {}), "full")
    for model, where in ((features_only, "features_only"), (full, "full")):
        unknown = set(model.weights) - set(FEATURES) - {EMBEDDING_FEATURE}
        if unknown:
            raise ValueError(f"routing weights: {where} names unknown features {sorted(unknown)}")
    emb = doc.get("embedding")
    embedding = None
    if emb:
        embedding = EmbeddingModel(
            str(emb.get("model", "")), float(emb["bias"]), tuple(float(c) for c in emb["coef"])
        )
    meta = {k: v for k, v in doc.items() if k not in {"features_only", "full", "embedding"}}
    return ScorerWeights(features_only, full, embedding, meta)


@dataclass(frozen=True)
class Score:
    """A complexity decision input: the score, what made it, and the detected task."""

    score: float
    features: Mapping[str, float]
    # name -> logit contribution, including "embedding" when the learned part ran.
    contributions: Mapping[str, float]
    learned: bool
    task: str | None

    def top(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` contributions of largest magnitude, rounded, largest first."""
        ranked = sorted(self.contributions.items(), key=lambda kv: -abs(kv[1]))
        return [(name, round(value, 3)) for name, value in ranked[:n] if value != 0.0]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


class ComplexityScorer:
    """Scores prompts with the weights of one file (see the module docstring)."""

    def __init__(self, weights: ScorerWeights) -> None:
        self.weights = weights

    @classmethod
    def load(cls, path: str | Path | None = None) -> ComplexityScorer:
        """A scorer over the weights at ``path`` (default: the bundled file)."""
        return cls(load_weights(path))

    @property
    def has_learned(self) -> bool:
        """True when the weights include the embedding model."""
        return self.weights.embedding is not None

    def score_features(self, text: str, turns: int = 1) -> Score:
        """The features-only score (no model call)."""
        features = extract_features(text, turns)
        return self._combine(self.weights.features_only, features, features, learned=False)

    def score_with_embedding(self, base: Score, vector: Sequence[float]) -> Score:
        """``base``'s features plus the learned embedding input, through the full model."""
        if self.weights.embedding is None:
            return base
        inputs = dict(base.features)
        inputs[EMBEDDING_FEATURE] = self.weights.embedding.logit(vector)
        return self._combine(self.weights.full, base.features, inputs, learned=True)

    @staticmethod
    def _combine(
        model: LogisticModel,
        features: Mapping[str, float],
        inputs: Mapping[str, float],
        *,
        learned: bool,
    ) -> Score:
        contributions = model.contributions(inputs)
        score = _sigmoid(model.bias + math.fsum(contributions.values()))
        return Score(score, features, contributions, learned, detect_task(features))


def read_prompts(path: str | Path | None = None) -> list[dict]:
    """The labelled prompts: dicts with ``text``, ``label`` ("simple"/"complex"),
    ``split`` ("train"/"test") and optional ``task`` and ``turns``."""
    path = Path(path) if path else DEFAULT_PROMPTS
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("label") not in ("simple", "complex") or not row.get("text"):
                raise ValueError(f"{path}:{number}: needs text and label simple|complex")
            if row.get("split") not in ("train", "test"):
                raise ValueError(f"{path}:{number}: split must be train or test")
            rows.append(row)
    return rows
