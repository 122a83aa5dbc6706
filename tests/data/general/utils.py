"""Documents of the harness_general_facts task: general_facts.jsonl beside this file, in memory (no dataset cache)."""

import json
from pathlib import Path

import datasets


def load_docs(**kwargs) -> datasets.DatasetDict:
    lines = Path(__file__).with_name("general_facts.jsonl").read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])}
    )
