#!/usr/bin/env python3
"""Generate the data of the `mc4` task suite, deterministically (stdlib only).

    python task_suites/mc4/generate.py            # rewrites task_suites/mc4/data/*.jsonl
    python task_suites/mc4/generate.py --out DIR  # writes the same files into DIR

Every run produces byte-identical files (fixed seed, no dependence on the environment). Four
multiple-choice tasks of different kinds, each answered by ONE token of the SmolLM2 / Llama
tokenizer (" red", " up", " north", " A", ...). Labels are exactly balanced: 75 train / 25 test
per label. Train and test are disjoint BY CONSTRUCTION: each task builds a pool of distinct
prompts (or, for colours, holds out whole phrasings per person) and splits it per label.

Tasks (all synthetic, so the base model cannot know them):
- colours:  memorised attribute. 20 invented people (distinct surnames), 5 per favourite colour
            (red / blue / green / yellow); 20 phrasings of the question. Test asks about the SAME
            people with the 5 phrasings held out for that person (every phrasing and every
            person occur in train): it measures memorised facts, so its forgetting should show most clearly.
- trend:    rule-based classification of a sequence of 4-6 numbers (1-99): rising by a constant
            step (1-12) -> up, falling by one -> down, constant -> flat, going both up and down
            (irregular) -> mixed. No sequence is monotone but irregular, so the rule reads the same
            as "direction of change" and as "step of an arithmetic sequence".
- desk:     topic classification with an arbitrary house convention: a newsroom routes sport
            headlines to the north desk, science to the south, business to the east and food to
            the west. Templated headlines about invented teams, labs, firms and places; the label
            words carry no hint of the topic, so the base model can only guess.
- fields:   surface-format recognition under a house code: a form value -> its type code,
            email A, price B, date C, phone number D (4-5 written formats per type, invented
            names and domains). The letters are arbitrary, so the base model can only guess.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20250714
N_TRAIN, N_TEST = 300, 100

# --------------------------------------------------------------------------- colours
COLOURS = ["red", "blue", "green", "yellow"]
FIRST = ["Ad", "Bel", "Cor", "Dra", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lun", "Mor",
         "Nes", "Or", "Pel", "Quil", "Ros", "Sal", "Tor", "Ul", "Ver", "Wen", "Yar", "Zel"]
FIRST_END = ["bric", "wen", "ola", "ith", "ara", "dan", "mira", "ric", "essa", "un"]
LAST = ["Ambleside", "Brackwater", "Culvercombe", "Dellahaye", "Emberlin", "Farrowdale",
        "Glenmarsh", "Hollinsby", "Ivescombe", "Jessamond", "Kettlewick", "Lowthorne", "Marchbank",
        "Nettlefold", "Orrington", "Pemberthy", "Quenby", "Rushmere", "Saltonstall", "Tregarrick",
        "Ulverley", "Vantreece", "Wickersham", "Yelverton", "Zandvoort"]
COLOUR_TEMPLATES = [
    "The favourite colour of {name} is",
    "{name} says the best colour of all is",
    "Asked to pick a colour, {name} always picks",
    "{name} paints every room of the house",
    "Most of the clothes {name} owns are",
    "The colour {name} loves most is",
    "The front door of {name} is painted",
    "Friends of {name} know that the favourite colour is",
    "{name} always buys a car that is",
    "The walls of the study of {name} are",
    "The umbrella {name} carries is",
    "Every gift from {name} is wrapped in paper that is",
    "The bicycle {name} rides to work is",
    "At the art class, {name} reaches first for the paint that is",
    "The mug {name} drinks from is",
    "For the party, {name} chose balloons that were",
    "The notebook {name} writes in has a cover that is",
    "On the team shirt, {name} wanted the colour",
    "The garden gate of {name} is painted",
    "Given any choice of colour, {name} goes for",
]
N_PEOPLE = 20  # x 20 phrasings = 400: 15 phrasings per person in train, 5 held out for test


def colours(rng: random.Random) -> tuple[list[dict], list[dict]]:
    names: list[str] = []
    while len(names) < N_PEOPLE:
        name = f"{rng.choice(FIRST)}{rng.choice(FIRST_END)} {rng.choice(LAST)}"
        if name.split()[1] not in {n.split()[1] for n in names}:
            names.append(name)
    favs = [COLOURS[i % len(COLOURS)] for i in range(N_PEOPLE)]
    rng.shuffle(favs)
    n_t = len(COLOUR_TEMPLATES)
    k = (N_PEOPLE * n_t - N_TRAIN) // N_PEOPLE  # 5 held-out phrasings per person
    assert N_PEOPLE * (n_t - k) == N_TRAIN and N_PEOPLE * k == N_TEST
    train, test = [], []
    for i, (name, colour) in enumerate(zip(names, favs)):
        held = {(i * k + j) % n_t for j in range(k)}  # rotating: every phrasing is held out for someone
        for t, template in enumerate(COLOUR_TEMPLATES):
            rec = {"name": name, "question": template.format(name=name), "label": colour}
            (test if t in held else train).append(rec)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --------------------------------------------------------------------------- trend
TRENDS = ["up", "down", "flat", "mixed"]


def _trend_of(seq: list[int]) -> str:
    steps = {b - a for a, b in zip(seq, seq[1:])}
    if steps == {0}:
        return "flat"
    if len(steps) == 1:
        return "up" if steps.pop() > 0 else "down"
    if any(d > 0 for d in steps) and any(d < 0 for d in steps):
        return "mixed"
    return "irregular-monotone"  # never kept: ambiguous under the rule


def _trend_seq(rng: random.Random, label: str) -> list[int]:
    n = rng.randint(4, 6)
    if label == "flat":
        return [rng.randint(1, 99)] * n
    if label in ("up", "down"):
        step = rng.randint(1, 12)
        first = rng.randint(1, 99 - step * (n - 1))
        seq = [first + step * i for i in range(n)]
        return seq if label == "up" else seq[::-1]
    return [rng.randint(1, 99) for _ in range(n)]


def trend(rng: random.Random, per_label: int) -> list[dict]:
    pool: dict[str, dict] = {}
    for label in TRENDS:
        n = 0
        while n < per_label:
            seq = _trend_seq(rng, label)
            text = " ".join(map(str, seq))
            if _trend_of(seq) == label and text not in pool:
                pool[text] = {"sequence": text, "label": label}
                n += 1
    return list(pool.values())


# --------------------------------------------------------------------------- desk
DESKS = {  # the newsroom's convention: topic -> desk (label words carry no topic hint)
    "north": [  # sport
        "{team} beat {team2} in the cup final", "{team} sign a new goalkeeper from {place}",
        "Record crowd in {place} watches {team} win the derby", "{team} sack their coach after a fifth defeat",
        "Runner from {place} wins the city marathon", "{team} hold {team2} to a goalless draw",
    ],
    "south": [  # science
        "Researchers at {lab} discover a new species of beetle", "{lab} telescope spots a distant comet",
        "Study from {lab} links sleep to memory", "Fossil found near {place} rewrites dinosaur history",
        "{lab} chemists build a faster battery", "Rare bird seen near {place} for the first time in decades",
    ],
    "east": [  # business
        "Shares in {firm} fall after a profit warning", "{firm} agrees to buy a rival for two billion",
        "{firm} opens a new factory in {place}", "Bank raises rates as prices climb in {place}",
        "{firm} cuts four hundred jobs", "Investors cheer as {firm} doubles its profits",
    ],
    "west": [  # food
        "New bakery in {place} sells out of sourdough", "Chef at {cafe} wins a prize for her soup",
        "{cafe} adds a vegan menu", "Street food market opens in {place}",
        "{cafe} shares its secret recipe for apple pie", "Cheese festival returns to {place}",
    ],
}
TEAMS = ["Vornwick Rovers", "Halden United", "Sorrel Athletic", "Brackley Town", "Quenmoor City",
         "Tarrow Wanderers", "Ostley Rangers", "Pellham Albion"]
LABS = ["the Varnell Institute", "Kestwick University", "the Orlan Lab", "Dunmore College",
        "the Pryce Centre", "Elmsworth University"]
FIRMS = ["Corvane Ltd", "Brightwell Group", "Taltech", "Mossgate Foods", "Quillon Motors",
         "Arden Steel", "Norvik Energy", "Pellax"]
CAFES = ["the Copper Kettle", "Maple Row Diner", "the Blue Heron", "Saffron House",
         "the Old Mill Cafe", "Juniper Kitchen"]
PLACES = ["Velmora", "Quistan", "Drovik", "Talbrenn", "Oskavel", "Marrowick", "Zuthen",
          "Pellacor", "Ilsworth", "Cragmere"]
HEAD_OPENERS = ["", "Breaking: ", "Update: ", "Tonight: "]


def desk(rng: random.Random, per_label: int) -> list[dict]:
    pool: dict[str, dict] = {}
    for label, templates in DESKS.items():
        n = 0
        while n < per_label:
            team, team2 = rng.sample(TEAMS, 2)
            body = rng.choice(templates).format(team=team, team2=team2, lab=rng.choice(LABS),
                                                firm=rng.choice(FIRMS), cafe=rng.choice(CAFES),
                                                place=rng.choice(PLACES))
            text = f"{rng.choice(HEAD_OPENERS)}{body}"
            text = text[0].upper() + text[1:]
            if text not in pool:
                pool[text] = {"headline": text, "label": label}
                n += 1
    return list(pool.values())


# --------------------------------------------------------------------------- fields
FIELD_CODES = {"email": "A", "price": "B", "date": "C", "phone": "D"}  # the house code
GIVEN = ["mira", "tomas", "elin", "ravi", "odile", "jonah", "sana", "bruno", "lea", "kofi", "ines", "piet"]
FAMILY = ["holt", "varga", "okafor", "lindqvist", "moreau", "tanaka", "brennan", "castell", "duarte",
          "keller"]
DOMAINS = ["quistan.net", "drovik.org", "velmora.com", "talbrenn.io", "oskavel.co", "zuthen.mail"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def _field_value(rng: random.Random, kind: str) -> str:
    d = lambda k: "".join(str(rng.randint(0, 9)) for _ in range(k))  # noqa: E731
    if kind == "email":
        g, f, dom = rng.choice(GIVEN), rng.choice(FAMILY), rng.choice(DOMAINS)
        return rng.choice([f"{g}.{f}@{dom}", f"{g[0]}.{f}@{dom}", f"{f}{rng.randint(1, 99)}@{dom}",
                           f"{g}_{f}@{dom}"])
    if kind == "price":
        amount = f"{rng.randint(1, 499)}.{d(2)}"
        return rng.choice([f"€{amount}", f"${amount}", f"£{amount}", f"{amount} EUR", f"USD {amount}"])
    if kind == "date":
        y, m, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        return rng.choice([f"{day:02d}.{m:02d}.{y}", f"{y}-{m:02d}-{day:02d}", f"{day} {MONTHS[m - 1]} {y}",
                           f"{MONTHS[m - 1]} {day}, {y}", f"{day:02d}/{m:02d}/{y}"])
    return rng.choice([f"+{rng.randint(30, 49)} {d(2)} {d(3)} {d(4)}", f"({d(4)}) {d(3)} {d(4)}",
                       f"{d(3)}-{d(3)}-{d(4)}", f"0{d(3)} {d(7)}"])


def fields(rng: random.Random, per_label: int) -> list[dict]:
    pool: dict[str, dict] = {}
    for kind, code in FIELD_CODES.items():
        n = 0
        while n < per_label:
            value = _field_value(rng, kind)
            if value not in pool:
                pool[value] = {"value": value, "label": code}
                n += 1
    return list(pool.values())


# --------------------------------------------------------------------------- main
def split(pool: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Stratified: the same share of every label in train and test, then shuffled."""
    labels = sorted({r["label"] for r in pool})
    n_tr, n_te = N_TRAIN // len(labels), N_TEST // len(labels)
    train, test = [], []
    for label in labels:
        group = [r for r in pool if r["label"] == label]
        rng.shuffle(group)
        train += group[:n_tr]
        test += group[n_tr:n_tr + n_te]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def build() -> dict[str, tuple[list[dict], list[dict]]]:
    per = (N_TRAIN + N_TEST) // 4
    out = {}
    out["colours"] = colours(random.Random(f"{SEED}-colours"))
    out["trend"] = split(trend(random.Random(f"{SEED}-trend"), per), random.Random(f"{SEED}-trend-split"))
    out["desk"] = split(desk(random.Random(f"{SEED}-desk"), per), random.Random(f"{SEED}-desk-split"))
    out["fields"] = split(fields(random.Random(f"{SEED}-fields"), per), random.Random(f"{SEED}-fields-split"))
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
        assert len(train) == N_TRAIN and len(test) == N_TEST
        assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in test}
        write_jsonl(args.out / f"{name}.train.jsonl", train)
        write_jsonl(args.out / f"{name}.test.jsonl", test)
        print(f"{name}: {len(train)} train, {len(test)} test -> {args.out}")


if __name__ == "__main__":
    main()
