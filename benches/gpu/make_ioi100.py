"""Writes 100 IOI-style prompts (50 swap pairs, one template shape, so every prompt has the same
token length) for the 8B bench: benches/gpu/ioi100.jsonl. Every name, place and object is checked
to be one token (with its leading space) in the SmolLM2 tokenizer the bench models use.

Usage: python benches/gpu/make_ioi100.py TOKENIZER_JSON OUT_JSONL
"""
import itertools
import json
import random
import sys

from tokenizers import Tokenizer

tok = Tokenizer.from_file(sys.argv[1])
NAMES = ["John", "Mary", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Anna", "Mark", "Kate",
         "Peter", "Lisa", "David", "Emma", "Jack", "Sarah", "Mike", "Laura", "Steve", "Rose", "Adam", "Jane"]
PLACES = ["shops", "park", "school", "store", "beach", "office", "garden", "market", "house", "station"]
OBJECTS = ["bag", "ball", "book", "drink", "key", "cake", "letter", "ring", "hat", "pen"]


def one_token(word):
    return len(tok.encode(" " + word, add_special_tokens=False).ids) == 1


for group in (NAMES, PLACES, OBJECTS):
    bad = [w for w in group if not one_token(w)]
    group[:] = [w for w in group if one_token(w)]
    if bad:
        print("dropped (not one token):", bad, file=sys.stderr)
rng = random.Random(0)
pairs = list(itertools.permutations(NAMES, 2))
rng.shuffle(pairs)
lines = []
for a, b in pairs[:50]:
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    base = f"When {a} and {b} went to the {place}, {{}} gave the {obj} to"
    lines.append({"clean": base.format(b), "answers": [" " + a, " " + b]})
    lines.append({"clean": base.format(a), "answers": [" " + b, " " + a]})
lengths = {len(tok.encode(p["clean"], add_special_tokens=False).ids) for p in lines}
assert len(lengths) == 1, f"prompts differ in length: {lengths}"
with open(sys.argv[2], "w") as f:
    for p in lines:
        f.write(json.dumps(p) + "\n")
print(len(lines), "prompts of", lengths.pop(), "tokens")
