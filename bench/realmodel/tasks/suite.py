"""A task suite with checkable answers, built from real texts on this machine (seeded, deterministic).

Three task families, each a filler document (real text cut at paragraph
boundaries) with made-up facts inserted between paragraphs:

  passkey     "The pass key is 48213. Remember it. 48213 is the pass key." at a
              random depth; "What is the pass key?"; answer: the number.
  kv          four to six "The secret code for <word> is <number>." facts spread
              through the text; asked about one (kv1) or about two at once (kv2,
              both numbers must be in the answer).
  qa          three "<Name> was born in <City>." facts spread through the text; asked
              where one of them was born; answer: the city (a span of the context).

Two disjoint splits with different seeds AND different filler sources:

  judge       the licences under /usr/share/common-licenses
  tune        docstrings of Python standard-library modules (/usr/lib/python3.11)

``instances(split, n, ...)`` returns dicts: id, task, split, source, seed, depth(s),
context (the text that goes before the question in the user turn), question,
answers (list of alternatives; each alternative a list of strings that must all
appear), and the document's length in characters. Lengths are set in characters
(about 4.2 characters a token on these texts), so the instances do not depend on a
tokenizer; each run records its token counts.

    python suite.py --split judge --n 4      # print a few instances
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/realmodel
import prompts  # noqa: E402  (its docstrings reader)

LICENSES = "/usr/share/common-licenses"
PYLIB = "/usr/lib/python3.11"

SOURCES = {
    "judge": [f"{LICENSES}/{n}" for n in ("Apache-2.0", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-1.1", "MPL-2.0",
                                            "GFDL-1.3", "Artistic")],
    "tune": [f"docstrings:{PYLIB}/{n}" for n in ("subprocess.py", "argparse.py", "textwrap.py", "shutil.py",
                                                  "pathlib.py", "logging/__init__.py", "json/__init__.py",
                                                  "tarfile.py", "zipfile.py", "socket.py")],
}
SEEDS = {"judge": 20261207, "tune": 1337}
TASKS = ("passkey", "kv1", "kv2", "qa")

WORDS = ["apple", "river", "candle", "falcon", "garden", "harbor", "island", "jungle", "kettle", "lantern",
         "meadow", "needle", "orchid", "pepper", "quartz", "rocket", "saddle", "tiger", "umbrella", "violin",
         "walnut", "yogurt", "zebra", "anchor", "bridge", "copper", "dragon", "engine", "feather", "glacier",
         "hammer", "ivory", "jacket", "kitten", "ladder", "marble", "nickel", "oyster", "pillow", "rabbit"]
FIRST = ["Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas", "Keiko",
         "Luca", "Mara", "Nikolai", "Olga", "Pablo", "Rosa", "Stefan", "Tomas", "Uma", "Viktor", "Wanda"]
LAST = ["Abernathy", "Bergstrom", "Castellano", "Drummond", "Eriksen", "Fairbanks", "Galloway", "Hartmann",
        "Iverson", "Jablonski", "Kowalczyk", "Lindqvist", "Montgomery", "Novak", "Okafor", "Pemberton",
        "Quintero", "Rasmussen", "Szabo", "Thorne", "Underwood", "Vasquez"]
CITIES = ["Lisbon", "Nairobi", "Montreal", "Osaka", "Krakow", "Melbourne", "Santiago", "Reykjavik", "Casablanca",
          "Helsinki", "Bogota", "Dublin", "Istanbul", "Vancouver", "Marseille", "Hanoi", "Edinburgh", "Seville",
          "Tallinn", "Auckland", "Zurich", "Valparaiso", "Bergen", "Cordoba"]


def docstrings(path: str) -> str:
    """Module, class and function docstrings of a Python source file, in source order, unlabelled."""
    return prompts.docstrings(path, labels=False)


def paragraphs(source: str) -> list[str]:
    if source.startswith("docstrings:"):
        text = docstrings(source.split(":", 1)[1])
    else:
        with open(source, encoding="utf-8", errors="replace") as f:
            text = f.read()
    paras = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    # Drop blocks that are too short to matter or mostly not prose.
    return [p for p in paras if len(p.strip()) >= 40]


def filler(rng: random.Random, split: str, chars: int) -> tuple[str, list[str]]:
    """(source, paragraphs): consecutive paragraphs of one source (wrapping around) totalling >= chars."""
    source = rng.choice(SOURCES[split])
    paras = paragraphs(source)
    start = rng.randrange(len(paras))
    out, total, i = [], 0, start
    while total < chars and len(out) < 4 * len(paras):
        p = paras[i % len(paras)]
        out.append(p)
        total += len(p) + 2
        i += 1
    return source, out


def insert(paras: list[str], facts: list[str], depths: list[float]) -> str:
    """Inserts each fact as its own paragraph at its depth (fraction of the paragraphs)."""
    paras = list(paras)
    # Insert deepest first so the earlier indices stay valid.
    for fact, d in sorted(zip(facts, depths), key=lambda x: -x[1]):
        paras.insert(round(d * len(paras)), fact)
    return "\n\n".join(paras)


def make(split: str, index: int, task: str, min_chars: int, max_chars: int) -> dict:
    seed = SEEDS[split] * 1000 + index
    rng = random.Random(seed)
    chars = rng.randrange(min_chars, max_chars)
    source, paras = filler(rng, split, chars)
    if task == "passkey":
        key = str(rng.randrange(10000, 100000))
        depth = rng.uniform(0.05, 0.95)
        facts, depths = [f"The pass key is {key}. Remember it. {key} is the pass key."], [depth]
        question = "What is the pass key? Answer with the number only."
        answers = [[key]]
    elif task in ("kv1", "kv2"):
        k = rng.randrange(4, 7)
        words = rng.sample(WORDS, k)
        codes = [str(rng.randrange(1000, 10000)) for _ in words]
        facts = [f"The secret code for {w} is {c}." for w, c in zip(words, codes)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in words)
        if task == "kv1":
            j = rng.randrange(k)
            question = f"What is the secret code for {words[j]}? Answer with the number only."
            answers = [[codes[j]]]
        else:
            a, b = sorted(rng.sample(range(k), 2))
            question = (f"What are the secret codes for {words[a]} and for {words[b]}? Answer with the two "
                        "numbers only.")
            answers = [[codes[a], codes[b]]]
    elif task == "qa":
        people = []
        while len(people) < 3:
            p = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            if p not in people and p.split()[0] not in [q.split()[0] for q in people]:
                people.append(p)
        cities = rng.sample(CITIES, 3)
        facts = [f"{p} was born in {c}." for p, c in zip(people, cities)]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in people)
        j = rng.randrange(3)
        question = f"In which city was {people[j]} born? Answer with the city name only."
        answers = [[cities[j]]]
    else:
        raise ValueError(task)
    doc = insert(paras, facts, depths)
    context = "Read the document below. It contains a few facts that you will be asked about.\n\n" + doc
    return {"id": f"{split}-{index:03d}-{task}", "task": task, "split": split, "source": source, "seed": seed,
            "depths": [round(d, 3) for d in depths], "facts": facts, "context": context, "question": question,
            "answers": answers, "chars": len(context)}


def instances(split: str, n: int, min_chars: int = 4000, max_chars: int = 7600) -> list[dict]:
    """The first n instances of a split, cycling through the task families."""
    return [make(split, i, TASKS[i % len(TASKS)], min_chars, max_chars) for i in range(n)]


_NUM = re.compile(r"\d+")


def correct(answer: str, answers: list[list[str]]) -> bool:
    """True when some alternative's strings all appear in the answer (numbers as whole numbers, words case-blind)."""
    numbers = set(_NUM.findall(answer))
    low = answer.lower()
    for alt in answers:
        if all((s in numbers) if s.isdigit() else (s.lower() in low) for s in alt):
            return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=sorted(SOURCES), default="judge")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="print the whole context")
    args = ap.parse_args()
    for inst in instances(args.split, args.n):
        show = dict(inst)
        if not args.full:
            show["context"] = inst["context"][:200] + " ..."
        print(json.dumps(show, indent=1))
    # The two splits share no source text.
    assert not set(SOURCES["judge"]) & set(SOURCES["tune"])


if __name__ == "__main__":
    main()
