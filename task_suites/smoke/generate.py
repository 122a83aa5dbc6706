#!/usr/bin/env python3
"""Generate the data of the `smoke` task suite, deterministically (stdlib only).

    python task_suites/smoke/generate.py            # rewrites task_suites/smoke/data/*.jsonl
    python task_suites/smoke/generate.py --out DIR  # writes the same files into DIR

Three tiny tasks (64 train / 32 test each) for CI with the random `tiny-llama` test model: they
exercise every code path (two multiple-choice label sets, one generation task) in seconds and are
not meant to be learned well. Train and test are disjoint by construction (distinct prompts,
split after de-duplication).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 7
N_TRAIN, N_TEST = 64, 32
LETTERS = "abcdefghij"


def parity(rng: random.Random) -> list[dict]:
    nums = rng.sample(range(100, 1000), N_TRAIN + N_TEST)
    return [{"number": n, "label": n % 2} for n in nums]  # label: int index into [even, odd]


def weather(rng: random.Random) -> list[dict]:
    temps = rng.sample(range(-40, 61), N_TRAIN + N_TEST)
    return [{"temp": t, "label": "cold" if t < 10 else ("mild" if t < 25 else "hot")} for t in temps]


def copy(rng: random.Random) -> list[dict]:
    pool: dict[str, dict] = {}
    while len(pool) < N_TRAIN + N_TEST:
        w = "".join(rng.choice(LETTERS) for _ in range(3))
        pool.setdefault(w, {"word": w, "answer": w})
    return list(pool.values())


def build() -> dict[str, tuple[list[dict], list[dict]]]:
    out = {}
    for name, fn in (("parity", parity), ("weather", weather), ("copy", copy)):
        rows = fn(random.Random(f"{SEED}-{name}"))
        out[name] = (rows[:N_TRAIN], rows[N_TRAIN:])
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (train, test) in build().items():
        write_jsonl(args.out / f"{name}.train.jsonl", train)
        write_jsonl(args.out / f"{name}.test.jsonl", test)
        print(f"{name}: {len(train)} train, {len(test)} test -> {args.out}")


if __name__ == "__main__":
    main()
