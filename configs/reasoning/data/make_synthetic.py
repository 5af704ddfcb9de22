"""Write the synthetic arithmetic demo data (tasks.reasoning.synthetic_arithmetic), offline and seeded:

    synthetic_arithmetic_train.json   400 rows, instruction schema (the fine-tuning set)
    synthetic_arithmetic_test.json    100 rows, instruction schema, none of them in the training set
    ../lm_eval/synthetic_arithmetic.jsonl   the same 100 test rows as 4-way multiple choice for lm-eval

Run from the repository root: python configs/reasoning/data/make_synthetic.py
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tasks.reasoning import synthetic_arithmetic  # noqa: E402

train = synthetic_arithmetic(400, seed=0)
seen = {r["instruction"] for r in train}
test = [r for r in synthetic_arithmetic(140, seed=1) if r["instruction"] not in seen][:100]
(HERE / "synthetic_arithmetic_train.json").write_text(json.dumps(train, indent=1))
(HERE / "synthetic_arithmetic_test.json").write_text(json.dumps(test, indent=1))
rng = random.Random(2)
with (HERE.parent / "lm_eval" / "synthetic_arithmetic.jsonl").open("w") as f:
    for r in test:
        gold = int(r["answer"])
        wrong = set()
        while len(wrong) < 3:
            w = gold + rng.choice([-10, -2, -1, 1, 2, 10, gold or 1])
            if w != gold and w >= 0:
                wrong.add(w)
        choices = [gold, *sorted(wrong)]
        rng.shuffle(choices)
        f.write(json.dumps({"question": r["instruction"], "choices": [str(c) for c in choices], "label": choices.index(gold)}) + "\n")
print(f"{len(train)} train, {len(test)} test rows written to {HERE}")
