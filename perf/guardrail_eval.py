"""Recall and false-positive rate of the guardrails' detectors on the labelled set
(tests/pipeline/guardrail_cases.py), plus the injection detector's false-positive rate on
real passages (the MS MARCO subset's corpus, when it is there) and the detectors' cost.

Recall per PII kind: the share of that kind's strings in which a value of that kind is
found. Injection recall: the share of attempts flagged, by where they sit (question,
passage). False-positive rate: the share of benign questions on which any detector fires
(and per detector). Run: ``python perf/guardrail_eval.py [--json out.json]
[--msmarco DIR]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from router import injection, pii  # noqa: E402
from tests.pipeline import guardrail_cases as cases  # noqa: E402


def evaluate(passages: list[str] | None = None) -> dict:
    """The figures on the main set, the held-out set's beside them (see the module doc)."""
    out = score(cases.PII, cases.INJECTION, cases.BENIGN)
    out["heldout"] = score(cases.HELDOUT_PII, cases.HELDOUT_INJECTION, cases.HELDOUT_BENIGN)
    if passages:
        flagged = [p for p in passages if injection.detect(p) is not None]
        out["msmarco_passages"] = {
            "n": len(passages), "injection_flagged": len(flagged),
            "false_positive_rate": len(flagged) / len(passages), "examples": flagged[:5],
        }
    texts = [t for t, _ in cases.PII] + [t for t, _ in cases.INJECTION] + cases.BENIGN
    per_text = []
    for _ in range(5):
        t0 = time.perf_counter()
        for t in texts:
            pii.find_pii(t)
            injection.detect(t)
        per_text.append((time.perf_counter() - t0) / len(texts))
    out["us_per_text_median_of_5"] = statistics.median(per_text) * 1e6
    out["us_per_answer"] = answer_cost(passages or [t for t, _ in cases.INJECTION])
    return out


ANSWER = ("Green tea is made from the unoxidised leaves of Camellia sinensis [1]. It contains "
          "catechins [2] and some caffeine, about 30 mg per cup [3]. Write to the shop at "
          "tea@example.com or call (415) 555-2671 for orders [4].")


def answer_cost(passages: list[str], rounds: int = 200) -> dict:
    """What the guardrails add to one Answer with the default policies: the question, 5
    passages, and an answer of ``ANSWER`` streamed word by word through the redactor
    (median and p95 over ``rounds``, microseconds)."""
    from router.guardrails import GuardrailSettings, Screen

    words = [w + " " for w in ANSWER.split(" ")]
    times = []
    for i in range(rounds):
        chosen = [passages[(5 * i + j) % len(passages)] for j in range(5)]
        t0 = time.perf_counter()
        screen = Screen(GuardrailSettings())
        screen.question("What is green tea made from, and how much caffeine is in it?")
        screen.passages([type("S", (), {"id": str(j), "text": t}) for j, t in enumerate(chosen)])
        redactor = screen.answer_stream()
        for w in words:
            redactor.feed(w)
        redactor.flush()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {"p50": statistics.median(times), "p95": times[int(0.95 * len(times))],
            "rounds": rounds, "answer_deltas": len(words)}


def score(PII: list, INJECTION: list, BENIGN: list) -> dict:
    """Recall per detector, false-positive rates, the misses and false positives."""
    recall: dict[str, float] = {}
    misses: list[str] = []
    for kind in pii.PII_KINDS:
        cases = [t for t, k in PII if k == kind]
        found = [t for t in cases if any(s.kind == kind for s in pii.find_pii(t))]
        recall[kind] = len(found) / len(cases)
        misses += [f"{kind}: {t}" for t in cases if t not in found]
    pii_found = sum(1 for t, k in PII if any(s.kind == k for s in pii.find_pii(t)))
    recall["pii_all"] = pii_found / len(PII)
    for where in ("question", "passage"):
        cases = [t for t, w in INJECTION if w == where]
        flagged = [t for t in cases if injection.detect(t) is not None]
        recall[f"injection_{where}"] = len(flagged) / len(cases)
        misses += [f"injection/{where}: {t}" for t in cases if t not in flagged]
    recall["injection_all"] = sum(1 for t, _ in INJECTION if injection.detect(t)) / len(INJECTION)
    fp_pii = [q for q in BENIGN if pii.find_pii(q)]
    fp_inj = [q for q in BENIGN if injection.detect(q) is not None]
    fp_any = {*fp_pii, *fp_inj}
    out = {
        "cases": {"pii": len(PII), "injection": len(INJECTION), "benign": len(BENIGN)},
        "recall": recall,
        "false_positive_rate": {
            "any": len(fp_any) / len(BENIGN), "pii": len(fp_pii) / len(BENIGN),
            "prompt_injection": len(fp_inj) / len(BENIGN),
        },
        "false_positives": sorted(fp_any),
        "misses": misses,
    }
    return out


def load_passages(directory: Path) -> list[str] | None:
    """The corpus texts of an MS MARCO-shaped directory (corpus.jsonl), or None."""
    path = directory / "corpus.jsonl"
    if not path.exists():
        return None
    with path.open() as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def markdown(r: dict) -> str:
    """A short table of the figures: the main set and the held-out set."""
    h = r["heldout"]
    c, hc = r["cases"], h["cases"]
    rows = [f"| cases (pii / injection / benign) | {c['pii']} / {c['injection']} / {c['benign']} "
            f"| {hc['pii']} / {hc['injection']} / {hc['benign']} |"]
    rows += [f"| recall {k} | {v:.3f} | {h['recall'][k]:.3f} |" for k, v in r["recall"].items()]
    rows += [f"| false positives ({k}) | {v:.3f} | {h['false_positive_rate'][k]:.3f} |"
             for k, v in r["false_positive_rate"].items()]
    if "msmarco_passages" in r:
        m = r["msmarco_passages"]
        rows.append(f"| injection flagged on {m['n']} MS MARCO passages | "
                    f"{m['false_positive_rate']:.4f} | |")
    return "| figure | main set | held-out |\n|---|---|---|\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--msmarco", type=Path, default=ROOT.parent / "shared" / "datasets" / "msmarco")
    args = ap.parse_args()
    result = evaluate(load_passages(args.msmarco))
    print(markdown(result))
    for name, part in (("main", result), ("held-out", result["heldout"])):
        print(f"{name} misses:", *part["misses"], sep="\n  ")
        print(f"{name} false positives:", *part["false_positives"], sep="\n  ")
    if "msmarco_passages" in result:
        print("msmarco flagged examples:", *result["msmarco_passages"]["examples"], sep="\n  ")
    print(f"cost: {result['us_per_text_median_of_5']:.0f} us per text (PII + injection)")
    a = result["us_per_answer"]
    print(f"per Answer (question + 5 passages + {a['answer_deltas']} deltas): "
          f"p50 {a['p50']:.0f} us, p95 {a['p95']:.0f} us over {a['rounds']} rounds")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
