#!/usr/bin/env python3
"""Writes the two small tasks that scripts/eval_harness.sh runs (tasks/*.jsonl), deterministically.

  facts.jsonl  100 four-way multiple-choice questions (capitals, opposites, young animals,
               colours, plurals, sums), scored by loglikelihood: the harness's
               `multiple_choice` output type.
  sums.jsonl   50 "What is A + B?" questions answered by generation: `generate_until`.

The questions are easy on purpose: a 135M model must land well above chance, so that a backend
that scores wrongly shows up as a different accuracy, not as noise around 0.25.
Run from anywhere; the files are committed, so the harness needs no downloads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tasks"

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "Russia": "Moscow",
    "China": "Beijing", "India": "New Delhi", "Brazil": "Brasilia", "Mexico": "Mexico City",
    "Kenya": "Nairobi", "Greece": "Athens", "Portugal": "Lisbon", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Ireland": "Dublin", "Argentina": "Buenos Aires",
    "Turkey": "Ankara", "Peru": "Lima", "Thailand": "Bangkok", "Austria": "Vienna",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "wet": "dry",
    "rich": "poor", "strong": "weak", "loud": "quiet", "push": "pull", "win": "lose",
    "buy": "sell", "true": "false", "thick": "thin", "high": "low", "inside": "outside",
    "first": "last", "love": "hate", "clean": "dirty", "left": "right",
}
YOUNG = {
    "dog": "puppy", "cat": "kitten", "cow": "calf", "sheep": "lamb", "horse": "foal",
    "duck": "duckling", "frog": "tadpole", "bear": "cub", "kangaroo": "joey", "goose": "gosling",
}
COLOURS = {
    "a clear sky": "blue", "fresh grass": "green", "snow": "white", "coal": "black",
    "a ripe banana": "yellow", "blood": "red", "a ripe orange": "orange", "a lemon": "yellow",
    "milk": "white", "a ripe tomato": "red",
}
COLOUR_NAMES = ["blue", "green", "white", "black", "yellow", "red", "orange", "purple", "brown"]
PLURALS = {
    "child": ("children", ["childs", "childrens", "childes"]),
    "mouse": ("mice", ["mouses", "mices", "meese"]),
    "foot": ("feet", ["foots", "feets", "footes"]),
    "tooth": ("teeth", ["tooths", "teeths", "toothes"]),
    "man": ("men", ["mans", "mens", "manes"]),
    "woman": ("women", ["womans", "womens", "womanes"]),
    "goose": ("geese", ["gooses", "geeses", "goosen"]),
    "person": ("people", ["persons", "peoples", "personen"]),
    "knife": ("knives", ["knifes", "knive", "knifs"]),
    "leaf": ("leaves", ["leafs", "leafes", "leave"]),
}


def mc(rng: random.Random, question: str, answer: str, distractors: list[str]) -> dict:
    choices = [answer] + distractors[:3]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def others(rng: random.Random, pool: list[str], answer: str) -> list[str]:
    return rng.sample(sorted(set(pool) - {answer}), 3)


def facts(rng: random.Random) -> list[dict]:
    items = []
    capitals = list(CAPITALS.values())
    for country, city in CAPITALS.items():
        items.append(mc(rng, f"What is the capital of {country}?", city, others(rng, capitals, city)))
    opposites = list(OPPOSITES.values())
    for word, opposite in OPPOSITES.items():
        items.append(mc(rng, f"What is the opposite of \"{word}\"?", opposite, others(rng, opposites, opposite)))
    young = list(YOUNG.values())
    for animal, baby in YOUNG.items():
        items.append(mc(rng, f"What is a young {animal} called?", baby, others(rng, young, baby)))
    for thing, colour in COLOURS.items():
        items.append(mc(rng, f"What colour is {thing}?", colour, others(rng, COLOUR_NAMES, colour)))
    for word, (plural, wrong) in PLURALS.items():
        items.append(mc(rng, f"What is the plural of \"{word}\"?", plural, wrong))
    for _ in range(20):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        total = a + b
        wrong = rng.sample([n for n in range(total - 4, total + 5) if n != total and n > 0], 3)
        items.append(mc(rng, f"What is {a} + {b}?", str(total), [str(n) for n in wrong]))
    assert len(items) == 100
    return items


def sums(rng: random.Random) -> list[dict]:
    items = []
    for _ in range(50):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        items.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    return items


def write(name: str, rows: list[dict]) -> None:
    path = OUT / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {path} ({len(rows)} rows)")


if __name__ == "__main__":
    write("facts.jsonl", facts(random.Random(0)))
    write("sums.jsonl", sums(random.Random(1)))
