#!/usr/bin/env python3
"""Generate the `smoke15` task suite, deterministically (stdlib only): 15 tiny tasks of the smoke kinds.

    python task_suites/smoke15/generate.py                 # rewrites task_suites/smoke15/data/*.jsonl
    python task_suites/smoke15/generate.py --out DIR       # writes the same data files into DIR
    python task_suites/smoke15/generate.py --configs DIR   # also writes suite.yaml and the lm-eval YAMLs into DIR

The smoke suite scaled up to T = 15, for measuring what evaluation costs over a long sequence
(T·(T+1) evaluations with eval_schedule full, 2T-1 with diagonal_final) with the random tiny-llama
test model: ten multiple-choice tasks (2- to 4-way, each with its own label words) and five
generation tasks, 64 train / 32 test each. Nothing here is meant to be learned well. The table
TASKS below is the one definition of every task: data, suite.yaml and lm-eval YAMLs come from it.
Train and test are disjoint by construction (distinct prompts, split after de-duplication).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 15
N_TRAIN, N_TEST = 64, 32
HERE = Path(__file__).resolve().parent


def _numbers(lo: int, hi: int):
    return lambda rng: rng.sample(range(lo, hi + 1), N_TRAIN + N_TEST)


def _words(n: int, letters: str):
    def draw(rng: random.Random) -> list[str]:
        pool: dict[str, None] = {}
        while len(pool) < N_TRAIN + N_TEST:
            pool.setdefault("".join(rng.choice(letters) for _ in range(n)), None)
        return list(pool)
    return draw


def _pairs(rng: random.Random) -> list[tuple[int, int]]:
    pool: dict[tuple[int, int], None] = {}
    while len(pool) < N_TRAIN + N_TEST:
        a, b = rng.sample(range(10, 100), 2)
        pool.setdefault((a, b), None)
    return list(pool)


def _nonzero(rng: random.Random) -> list[int]:
    return rng.sample([v for v in range(-99, 100) if v], N_TRAIN + N_TEST)


def _season(day: int) -> int:
    return 0 if day < 80 or day >= 355 else 1 if day < 172 else 2 if day < 266 else 3


def _grade(score: int) -> int:
    return 0 if score < 40 else 1 if score < 60 else 2 if score < 75 else 3


# name -> (prompt, choices (None: generation), inputs(rng), record(input))
TASKS = {
    "parity": ("Number: {number}\nParity:", ["even", "odd"], _numbers(100, 999), lambda n: {"number": n, "label": n % 2}),
    "mod3": ("Number: {number}\nRemainder:", ["zero", "one", "two"], _numbers(100, 999), lambda n: {"number": n, "label": n % 3}),
    "size": ("Amount: {amount}\nSize:", ["small", "medium", "large"], _numbers(1, 999),
             lambda n: {"amount": n, "label": 0 if n < 300 else 1 if n < 700 else 2}),
    "sign": ("Value: {value}\nSign:", ["negative", "positive"], _nonzero, lambda v: {"value": v, "label": int(v > 0)}),
    "weather": ("Temperature: {temp}\nWeather:", ["cold", "mild", "hot"], _numbers(-40, 60),
                lambda t: {"temp": t, "label": "cold" if t < 10 else ("mild" if t < 25 else "hot")}),
    "season": ("Day: {day}\nSeason:", ["winter", "spring", "summer", "autumn"], _numbers(1, 365),
               lambda d: {"day": d, "label": _season(d)}),
    "grade": ("Score: {score}\nGrade:", ["fail", "pass", "merit", "distinction"], _numbers(0, 100),
              lambda s: {"score": s, "label": _grade(s)}),
    "digits": ("Number: {number}\nDigit sum:", ["low", "high"], _numbers(100, 999),
               lambda n: {"number": n, "label": int(sum(map(int, str(n))) >= 14)}),
    "vowel": ("Word: {word}\nStarts with:", ["vowel", "consonant"], _words(3, "abcdefghijklmnop"),
              lambda w: {"word": w, "label": 0 if w[0] in "aeiou" else 1}),
    "compare": ("Pair: {a} {b}\nLarger:", ["first", "second"], _pairs, lambda p: {"a": p[0], "b": p[1], "label": int(p[1] > p[0])}),
    "copy": ("Copy: {word}\nOut:", None, _words(3, "abcdefghij"), lambda w: {"word": w, "answer": w}),
    "reverse": ("Reverse: {word}\nOut:", None, _words(3, "abcdefghij"), lambda w: {"word": w, "answer": w[::-1]}),
    "upper": ("Upper: {word}\nOut:", None, _words(3, "klmnopqrst"), lambda w: {"word": w, "answer": w.upper()}),
    "succ": ("Next: {number}\nOut:", None, _numbers(10, 998), lambda n: {"number": n, "answer": str(n + 1)}),
    "initial": ("Initial: {word}\nOut:", None, _words(4, "abcdefghij"), lambda w: {"word": w, "answer": w[0]}),
}
# One order, the two kinds interleaved.
ORDER = ["parity", "copy", "weather", "reverse", "mod3", "size", "upper", "sign", "season", "succ", "grade", "digits",
         "initial", "vowel", "compare"]


def build() -> dict[str, tuple[list[dict], list[dict]]]:
    out = {}
    for name, (_, _, inputs, record) in TASKS.items():
        rows = [record(x) for x in inputs(random.Random(f"{SEED}-{name}"))]
        out[name] = (rows[:N_TRAIN], rows[N_TRAIN:])
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def suite_yaml() -> str:
    q = json.dumps  # a JSON string is a valid YAML scalar
    lines = [
        "# Written by generate.py --configs from its TASKS table; edit the table, not this file.",
        "name: smoke15",
        "description: >",
        "  The smoke suite scaled up to 15 tiny synthetic tasks (64 train / 32 test each) for measuring",
        "  evaluation cost over a long sequence with the random tiny-llama test model: ten multiple-choice",
        "  tasks (2- to 4-way, each with its own label words) and five generation tasks. Nothing here is",
        "  expected to be learned well. LoRI-S with disjoint masks needs mask_density <= 1/15 (e.g. 0.06).",
        "  Generated by generate.py.",
        "recommended_model: tiny-llama",
        "budget:",
        "  epochs: 1",
        "  batch_size: 8",
        "  max_seq_len: 32",
        "  lr: {lora: 1.0e-3, lori-d: 1.0e-3, lori-s: 1.0e-2}",
        "orders:",
        f"  - [{', '.join(ORDER)}]",
        "tasks:",
    ]
    for name, (prompt, choices, _, _) in TASKS.items():
        lines += [f"  - name: {name}", f"    kind: {'multiple_choice' if choices else 'generate'}",
                  f"    train: {{path: data/{name}.train.jsonl}}", f"    prompt: {q(prompt)}",
                  f"    target: {q(' {answer}' if choices else ' {answer}' + chr(10))}"]
        if choices:
            lines.append(f"    choices: [{', '.join(choices)}]")
        lines += [f"    lm_eval: {name}.yaml", f"    metric: {'acc' if choices else 'exact_match'}",
                  f"    sizes: {{train: {N_TRAIN}, test: {N_TEST}}}"]
    return "\n".join(lines) + "\n"


def lm_eval_yaml(name: str) -> str:
    fields = "doc_to_text/target/choice" if TASKS[name][1] else "doc_to_text/target"
    head = [f"# lm-eval 0.4.13 task, written by generate.py --configs; task name, {fields}", "# come from suite.yaml (harness.suites)."]
    body = [f"output_type: {'multiple_choice' if TASKS[name][1] else 'generate_until'}"]
    body += ["dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: data/{name}.test.jsonl", "test_split: test",
             "num_fewshot: 0"]
    if not TASKS[name][1]:
        body += ["generation_kwargs:", '  until: ["\\n"]', "  max_gen_toks: 6", "  do_sample: false", "filter_list:",
                 "  - name: strip", "    filter:", "      - function: remove_whitespace", "      - function: take_first"]
    metric = "acc" if TASKS[name][1] else "exact_match"
    body += ["metric_list:", f"  - metric: {metric}", "    aggregation: mean", "    higher_is_better: true", "metadata:",
             "  version: 1.0"]
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "data")
    ap.add_argument("--configs", type=Path, default=None, help="also write suite.yaml and <task>.yaml into this folder")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (train, test) in build().items():
        write_jsonl(args.out / f"{name}.train.jsonl", train)
        write_jsonl(args.out / f"{name}.test.jsonl", test)
    print(f"{len(TASKS)} tasks: {N_TRAIN} train, {N_TEST} test each -> {args.out}")
    if args.configs is not None:
        args.configs.mkdir(parents=True, exist_ok=True)
        (args.configs / "suite.yaml").write_text(suite_yaml(), encoding="utf-8")
        for name in TASKS:
            (args.configs / f"{name}.yaml").write_text(lm_eval_yaml(name), encoding="utf-8")
        print(f"suite.yaml and {len(TASKS)} lm-eval YAMLs -> {args.configs}")


if __name__ == "__main__":
    main()
