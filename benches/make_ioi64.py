"""Writes the 64 IOI prompts of the edge-attribution bench (benches/ioi64.jsonl): ABBA and BABA
alternating ("When A and B went to the P, B gave a O to" / "When B and A ..., B gave ..."), the
indirect object A the correct answer and the subject B the wrong one; the corrupted prompt is the
same sentence with both names drawn again (Hanna et al. 2024's IOI corruption). Every filler is
one token in SmolLM2's tokenizer, so every prompt has the same length and nothing is padded (the
Python reference then needs no padding logic).

Usage: python benches/make_ioi64.py TOKENIZER_JSON OUT_JSONL
"""
import json
import random
import sys

from tokenizers import Tokenizer

tok = Tokenizer.from_file(sys.argv[1])
NAMES = ["Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Alice", "Bob", "Sarah",
         "David", "Emma", "Paul", "Kate", "Mark", "Lisa", "Jack", "Anna", "Mike"]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]
for group in (NAMES, PLACES, OBJECTS):
    bad = [w for w in group if len(tok.encode(" " + w, add_special_tokens=False).ids) != 1]
    assert not bad, f"not one token: {bad}"
rng = random.Random(0)
lines = []
for i in range(64):
    a, b, c, d = rng.sample(NAMES, 4)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)

    def sentence(io, s):
        first, second = (io, s) if i % 2 == 0 else (s, io)
        return f"When {first} and {second} went to the {place}, {s} gave a {obj} to"

    lines.append({"clean": sentence(a, b), "corrupt": sentence(c, d), "answers": [" " + a, " " + b]})
lengths = {len(tok.encode(p[k], add_special_tokens=False).ids) for p in lines for k in ("clean", "corrupt")}
assert len(lengths) == 1, f"prompts differ in length: {lengths}"
with open(sys.argv[2], "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in lines)
