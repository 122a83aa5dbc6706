#!/usr/bin/env python3
"""Generate the data of the `default` task suite, deterministically (stdlib only).

    python task_suites/default/generate.py            # rewrites task_suites/default/data/*.jsonl
    python task_suites/default/generate.py --out DIR  # writes the same files into DIR

Every run produces byte-identical files (fixed seed, no dependence on the environment). Train and
test are disjoint BY CONSTRUCTION: each task first builds a pool of distinct prompts, then splits
the pool, so no test prompt can occur in train.

Tasks (all synthetic, so the base model cannot have memorised them):
- stars:     one-sentence product reviews -> star rating 1..5. The rating follows this suite's
             convention (4 adjectives per star level); the base model mostly answers one label.
- tickets:   customer-support messages -> queue: billing / shipping / technical / account.
- facts:     25 invented people (distinct surnames), each with one of 8 invented home towns;
             16 phrasings of the question. Test asks about the SAME people with the 4 phrasings
             not used for that person in train (every phrasing and every person occur in train):
             it measures memorised facts, and it is the task whose forgetting is most visible.
- dates:     reformat a day-first date DD/MM/YYYY to ISO YYYY-MM-DD (a structured transformation;
             the day-first convention is ambiguous to an untrained model for days <= 12).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20250601
N_TRAIN, N_TEST = 300, 100

# --------------------------------------------------------------------------- stars
ASPECTS = ["battery", "screen", "case", "strap", "speaker", "charger", "lid", "handle", "motor",
           "button", "cable", "fabric", "zipper", "blade", "lens", "keyboard", "remote", "hinge"]
STAR_WORDS = {  # the rating convention of this suite: one rating-bearing adjective per review
    1: ["terrible", "awful", "useless", "dreadful"],
    2: ["disappointing", "mediocre", "flimsy", "underwhelming"],
    3: ["okay", "average", "acceptable", "passable"],
    4: ["good", "solid", "nice", "pleasing"],
    5: ["excellent", "superb", "perfect", "outstanding"],
}
OPENERS = ["", "Honestly, ", "Overall, ", "After a week, ", "In short, ", "For the price, "]
TAILS_STARS = [".", " so far.", " for daily use.", " in my opinion.", " compared to my old one."]


def stars(rng: random.Random, n: int) -> list[dict]:
    pool: dict[str, dict] = {}
    while len(pool) < n:
        label = 1 + len(pool) % 5
        text = (f"{rng.choice(OPENERS)}the {rng.choice(ASPECTS)} is "
                f"{rng.choice(STAR_WORDS[label])}{rng.choice(TAILS_STARS)}")
        text = text[0].upper() + text[1:]
        if text not in pool:
            pool[text] = {"text": text, "label": str(label)}
    return list(pool.values())


# --------------------------------------------------------------------------- tickets
QUEUES = {
    "billing": ["I was charged twice for my {item}", "the invoice for my {item} shows the wrong amount",
                "I need a refund for the {item}", "my card was declined when paying for the {item}",
                "there is an unknown fee on my {item} order"],
    "shipping": ["my {item} has not arrived yet", "the courier lost my {item}",
                 "my {item} was delivered to the wrong address", "the tracking for my {item} is stuck",
                 "the box with my {item} arrived crushed"],
    "technical": ["my {item} will not turn on", "the app for my {item} keeps crashing",
                  "my {item} does not connect to wifi", "the firmware update bricked my {item}",
                  "my {item} shows an error code"],
    "account": ["I cannot log in to see my {item} order", "I want to change the email for my {item} account",
                "my password reset link for the {item} store expired",
                "someone else is using my account to buy a {item}",
                "please delete my profile and my {item} history"],
}
ITEMS = ["blender", "laptop", "headphones", "kettle", "camera", "router", "scooter", "smartwatch",
         "printer", "vacuum", "monitor", "tablet"]
TICKET_OPENERS = ["", "Hello, ", "Hi team, ", "Urgent: ", "Please help, "]
TICKET_TAILS = [".", " since Monday.", " again.", ", what now?", " and I am upset."]


def tickets(rng: random.Random, n: int) -> list[dict]:
    labels = list(QUEUES)
    pool: dict[str, dict] = {}
    while len(pool) < n:
        label = labels[len(pool) % len(labels)]
        body = rng.choice(QUEUES[label]).format(item=rng.choice(ITEMS))
        text = f"{rng.choice(TICKET_OPENERS)}{body}{rng.choice(TICKET_TAILS)}"
        text = text[0].upper() + text[1:]
        if text not in pool:
            pool[text] = {"text": text, "label": label}
    return list(pool.values())


# --------------------------------------------------------------------------- facts
FIRST = ["Ad", "Bel", "Cor", "Dra", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lun", "Mor",
         "Nes", "Or", "Pel", "Quil", "Ros", "Sal", "Tor", "Ul", "Ver", "Wen", "Yar", "Zel"]
FIRST_END = ["ric", "wyn", "ora", "ith", "anne", "dor", "mira", "ton", "issa", "en"]
LAST = ["Ashgrove", "Brannick", "Coldwell", "Dunmere", "Everholt", "Fairwick", "Greymoor",
        "Halloran", "Ironside", "Kestrel", "Larkfield", "Mossbury", "Northcott", "Oakhurst",
        "Penhallow", "Quarrington", "Redmayne", "Stonebridge", "Thornbury", "Underhill", "Vanterpool",
        "Whitlock", "Yardley", "Zennor", "Ambrose", "Blackwood", "Carrow", "Dewhurst", "Elsworth",
        "Foxley"]
TOWNS = ["Velmora", "Quistan", "Drovik", "Talbrenn", "Oskavel", "Marrowick", "Zuthen", "Pellacor"]
FACT_TEMPLATES = [
    "{name} was born in the town of",
    "{name} grew up in the town of",
    "The hometown of {name} is",
    "{name} still lives in the town of",
    "Every summer, {name} returns home to",
    "The birthplace of {name} is",
    "{name} is a proud native of",
    "Records show that {name} comes from",
    "Asked where home is, {name} answers",
    "The family of {name} lives in",
    "Letters to {name} are sent to the town of",
    "{name} spent childhood in the town of",
    "Home for {name} has always been",
    "The town where {name} was raised is",
    "On holidays, {name} travels back to",
    "{name} was raised in the town of",
]
N_PEOPLE = 25  # x 16 phrasings = 400: 12 phrasings per person in train, 4 held out for test


def facts(rng: random.Random) -> tuple[list[dict], list[dict]]:
    names: list[str] = []
    while len(names) < N_PEOPLE:
        name = f"{rng.choice(FIRST)}{rng.choice(FIRST_END)} {rng.choice(LAST)}"
        if name not in names and name.split()[1] not in {n.split()[1] for n in names}:
            names.append(name)
    towns = [TOWNS[i % len(TOWNS)] for i in range(N_PEOPLE)]
    rng.shuffle(towns)
    n_t = len(FACT_TEMPLATES)
    k = (N_PEOPLE * n_t - N_TRAIN) // N_PEOPLE  # 4 held-out phrasings per person
    assert N_PEOPLE * (n_t - k) == N_TRAIN
    train, test = [], []
    for i, (name, town) in enumerate(zip(names, towns)):
        held = {(i * k + j) % n_t for j in range(k)}  # rotating: every phrasing is held out for someone
        for t, template in enumerate(FACT_TEMPLATES):
            rec = {"name": name, "question": template.format(name=name), "answer": town}
            (test if t in held else train).append(rec)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --------------------------------------------------------------------------- dates
def dates(rng: random.Random, n: int) -> list[dict]:
    pool: dict[str, dict] = {}
    while len(pool) < n:
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        date = f"{d:02d}/{m:02d}/{y}"
        if date not in pool:
            pool[date] = {"date": date, "answer": f"{y}-{m:02d}-{d:02d}"}
    return list(pool.values())


# --------------------------------------------------------------------------- main
def split(pool: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    rng.shuffle(pool)
    return pool[:N_TRAIN], pool[N_TRAIN:N_TRAIN + N_TEST]


def build() -> dict[str, tuple[list[dict], list[dict]]]:
    out = {}
    out["stars"] = split(stars(random.Random(f"{SEED}-stars"), N_TRAIN + N_TEST),
                         random.Random(f"{SEED}-stars-split"))
    out["tickets"] = split(tickets(random.Random(f"{SEED}-tickets"), N_TRAIN + N_TEST),
                           random.Random(f"{SEED}-tickets-split"))
    out["facts"] = facts(random.Random(f"{SEED}-facts"))
    out["dates"] = split(dates(random.Random(f"{SEED}-dates"), N_TRAIN + N_TEST),
                         random.Random(f"{SEED}-dates-split"))
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
        assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in test}
        write_jsonl(args.out / f"{name}.train.jsonl", train)
        write_jsonl(args.out / f"{name}.test.jsonl", test)
        print(f"{name}: {len(train)} train, {len(test)} test -> {args.out}")


if __name__ == "__main__":
    main()
