"""Generate tilpass's shipped demo dataset: symptom description -> medical specialty.

The quickstart uses it to show that a LoRA adapter learned something: the base model scores low,
the adapted one clearly higher. Descriptions are built from templates, symptom wordings, ages,
sexes and durations. The test split uses templates and symptom wordings that never occur in the
training split, so its exact-match accuracy measures generalisation, not memorisation.

Deterministic: the same seed gives byte-identical files.

Usage:
    python scripts/make_dataset.py [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

SEED = 20241128
N_TRAIN_PER_LABEL = 30
N_TEST_PER_LABEL = 10
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "tilpass" / "data"

LABELS = (
    "cardiology",
    "dermatology",
    "endocrinology",
    "gastroenterology",
    "neurology",
    "ophthalmology",
    "orthopedics",
    "psychiatry",
    "pulmonology",
    "urology",
)

SYSTEM_PROMPT = "Name the medical specialty."

# label -> (training wordings, held-out wordings). Held-out wordings appear only in the test split.
SYMPTOMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cardiology": (
        (
            "chest pain on exertion",
            "palpitations",
            "swollen ankles",
            "breathlessness when lying flat",
            "a racing heartbeat",
            "pressure in the chest",
            "fainting during exercise",
            "an irregular pulse",
        ),
        (
            "tightness behind the breastbone",
            "a fluttering feeling in the chest",
            "a heart that skips beats",
            "puffy legs by evening",
        ),
    ),
    "dermatology": (
        (
            "an itchy rash",
            "a mole that changed shape",
            "red scaly patches on the elbows",
            "scarring acne",
            "hives",
            "a blistering rash",
            "dry cracked skin",
            "hair falling out in patches",
        ),
        (
            "a mole that bleeds",
            "flaky plaques on the scalp",
            "itchy welts on the arms",
            "a spreading skin lesion",
        ),
    ),
    "endocrinology": (
        (
            "excessive thirst",
            "unexplained weight gain",
            "always feeling cold and tired",
            "a swelling at the front of the neck",
            "heat intolerance",
            "very high blood sugar",
            "irregular periods and facial hair",
            "a fast metabolism and bulging eyes",
        ),
        (
            "drinking water constantly",
            "an enlarged thyroid",
            "feeling hot and jittery all the time",
            "abnormal glucose readings",
        ),
    ),
    "gastroenterology": (
        (
            "heartburn after meals",
            "bloody stools",
            "abdominal bloating",
            "chronic diarrhea",
            "difficulty swallowing food",
            "stomach cramps",
            "constipation",
            "vomiting after meals",
        ),
        (
            "acid reflux at night",
            "black tarry stools",
            "a swollen belly",
            "loose bowel movements",
        ),
    ),
    "neurology": (
        (
            "headaches with flashing lights",
            "numbness in one hand",
            "a tremor at rest",
            "seizures",
            "slurred speech",
            "memory lapses",
            "tingling in the feet",
            "sudden weakness in one arm",
        ),
        (
            "pins and needles in the fingers",
            "shaking hands",
            "a drooping face",
            "episodes of convulsions",
        ),
    ),
    "ophthalmology": (
        (
            "blurred vision",
            "red itchy eyes",
            "floaters in vision",
            "eye pain",
            "difficulty seeing at night",
            "a gritty feeling in the eye",
            "halos around lights",
            "watery eyes",
        ),
        (
            "cloudy eyesight",
            "spots drifting across the view",
            "a bloodshot, sore eye",
            "trouble reading small print",
        ),
    ),
    "orthopedics": (
        (
            "knee pain on stairs",
            "a swollen ankle after a fall",
            "lower back pain",
            "a stiff shoulder",
            "hip pain when walking",
            "a suspected broken wrist",
            "a clicking knee",
            "heel pain in the morning",
        ),
        (
            "a twisted knee that gives way",
            "an aching lower spine",
            "a sore, swollen joint after sport",
            "a hurting wrist after a fall",
        ),
    ),
    "psychiatry": (
        (
            "low mood",
            "panic attacks",
            "hearing voices",
            "constant worry",
            "loss of interest in everything",
            "racing thoughts",
            "intrusive thoughts",
            "mood swings",
        ),
        (
            "feeling hopeless",
            "sudden waves of terror",
            "a belief of being watched",
            "nonstop anxiety",
        ),
    ),
    "pulmonology": (
        (
            "a persistent cough",
            "wheezing",
            "coughing up blood",
            "shortness of breath on stairs",
            "snoring with pauses in breathing",
            "frequent chest infections",
            "a chronic cough with phlegm",
            "chest tightness in cold air",
        ),
        (
            "a whistling sound when breathing",
            "a cough that will not go away",
            "bringing up bloody sputum",
            "getting winded easily",
        ),
    ),
    "urology": (
        (
            "burning when urinating",
            "blood in the urine",
            "frequent urination at night",
            "a weak urine stream",
            "flank pain spreading to the groin",
            "difficulty emptying the bladder",
            "testicular pain",
            "leaking urine",
        ),
        (
            "painful peeing",
            "pink-tinged urine",
            "getting up to pee many times a night",
            "trouble starting to urinate",
        ),
    ),
}

# Template fields: {age}, {sex}, {dur}, {s1}, {s2}. Train and test templates differ in wording.
TRAIN_TEMPLATES = (
    "A {age}-year-old {sex} has had {s1} for {dur}.",
    "{age}-year-old {sex} with {s1} and {s2} for {dur}.",
    "Patient ({sex}, {age}) reports {s1} for {dur}.",
    "A {sex} aged {age} complains of {s1} and {s2}.",
    "For {dur}, this {age}-year-old {sex} has noticed {s1}.",
    "{Sex}, {age}: {s1}, {s2}.",
    "Referral for a {sex}, {age}, with {s1} lasting {dur}.",
    "Presents with {s1} and {s2}; {sex}, {age} years old.",
)
TEST_TEMPLATES = (
    "My {rel} ({age}) has {s1} and {s2}. It began {dur} ago.",
    "Seen today: age {age}, {sex}, {s1} for the past {dur}.",
    "{S1} plus {s2} in a {age} y/o {sex}, duration {dur}.",
    "Over the last {dur} I've had {s1}. I'm {age}.",
)

TRAIN_SEXES = ("man", "woman")
TEST_SEXES = ("male", "female")
RELATIVES = ("father", "mother", "husband", "wife", "son", "daughter")
TRAIN_DURATIONS = ("two days", "a week", "three weeks", "a month", "six months", "a year")
TEST_DURATIONS = ("ten days", "two months", "four weeks", "half a year", "a few days")


def _describe(rng: random.Random, template: str, s1: str, s2: str, split: str) -> str:
    """Fill one template with symptom wordings and a random age, sex and duration."""
    sex = rng.choice(TRAIN_SEXES if split == "train" else TEST_SEXES)
    return template.format(
        age=rng.randint(18, 85),
        sex=sex,
        Sex=sex.capitalize(),
        rel=rng.choice(RELATIVES),
        dur=rng.choice(TRAIN_DURATIONS if split == "train" else TEST_DURATIONS),
        s1=s1,
        S1=s1[0].upper() + s1[1:],
        s2=s2,
    )


def _pick_symptoms(
    rng: random.Random, train: tuple[str, ...], held_out: tuple[str, ...], split: str
) -> tuple[str, str]:
    """Two distinct wordings; in the test split the first (always used) one is held out."""
    if split == "train":
        s1, s2 = rng.sample(train, 2)
        return s1, s2
    s1 = rng.choice(held_out)
    pool = [w for w in held_out if w != s1] if rng.random() < 0.5 else list(train)
    return s1, rng.choice(pool)


def build(seed: int = SEED) -> dict[str, list[dict]]:
    """Return ``{"train": [...], "test": [...]}`` records in the chat ``messages`` format."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, templates, per_label in (
        ("train", TRAIN_TEMPLATES, N_TRAIN_PER_LABEL),
        ("test", TEST_TEMPLATES, N_TEST_PER_LABEL),
    ):
        for label in LABELS:
            train_words, held_out = SYMPTOMS[label]
            made = 0
            while made < per_label:
                t_index = made % len(templates)
                s1, s2 = _pick_symptoms(rng, train_words, held_out, split)
                text = _describe(rng, templates[t_index], s1, s2, split)
                if text in seen:
                    continue
                seen.add(text)
                made += 1
                splits[split].append(
                    {
                        "messages": [
                            {"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": text},
                            {"role": "assistant", "content": label},
                        ],
                        "meta": {"template": f"{split}-{t_index}", "seed": seed},
                    }
                )
        rng.shuffle(splits[split])
    return splits


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Write JSON lines to a temporary file in the same directory, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: write specialty_train.jsonl and specialty_test.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    args = parser.parse_args(argv)
    splits = build(args.seed)
    for split, records in splits.items():
        path = args.out / f"specialty_{split}.jsonl"
        _write_jsonl_atomic(path, records)
        print(f"wrote {len(records)} records to {path} (seed {args.seed})")


if __name__ == "__main__":
    main()
