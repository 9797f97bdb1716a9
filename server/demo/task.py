"""Synthetic chat task of the bundled demo model; answers are checked by a program.

Pure python and deterministic. Six skills, one phrasing each::

    add      "What is 47+89?"                    -> "136"    (operands 0..99)
    sub      "What is 81-34?"                    -> "47"     (0..99, never negative)
    mul      "What is 23*7?"                     -> "161"    (0..99 times 0..9, either order)
    reverse  "Reverse the word 'kqzt'."          -> "tzqk"   (3..5 random lowercase letters)
    sort     "Sort the letters of 'dbca'."       -> "abcd"   (3..5 letters, repeats allowed)
    count    "How many letters are in 'stone'?"  -> "5"      (2..8 letters)

Train and test sets are disjoint: a question belongs to the test split iff the md5 of
its text is 0 mod 10 (:func:`split_of`), so no test question is ever generated for
training, whatever the seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string

__all__ = ["SKILLS", "PHRASES", "Question", "make_question", "make_questions", "check", "split_of"]

SKILLS: tuple[str, ...] = ("add", "sub", "mul", "reverse", "sort", "count")

# the fixed question openings (the demo tokenizer has one token for each of them)
PHRASES: tuple[str, ...] = ("What is ", "Reverse the word '", "Sort the letters of '", "How many letters are in '")

_TEST_MODULUS = 10  # 1 question in 10 (by hash) is held out for testing
_LETTERS = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class Question:
    messages: list  # chat messages: [{"role": "user", "content": ...}]
    answer: str
    skill: str

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def split_of(text: str) -> str:
    """'test' or 'train': a fixed hash-based partition of question texts."""
    h = int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:8], "little")
    return "test" if h % _TEST_MODULUS == 0 else "train"


def _number(rng: random.Random) -> int:
    # mostly 2-digit operands, some 1-digit ones
    return rng.randint(0, 9) if rng.random() < 0.2 else rng.randint(10, 99)


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def make_question(skill: str, rng: random.Random) -> tuple[str, str]:
    """One (question text, answer) pair of ``skill`` drawn with ``rng`` (either split)."""
    if skill == "add":
        a, b = _number(rng), _number(rng)
        return f"What is {a}+{b}?", str(a + b)
    if skill == "sub":
        a, b = _number(rng), _number(rng)
        a, b = max(a, b), min(a, b)
        return f"What is {a}-{b}?", str(a - b)
    if skill == "mul":
        a = rng.randint(0, 99) if rng.random() < 0.85 else rng.randint(0, 9)
        b = rng.randint(0, 9)
        if rng.random() < 0.5:
            a, b = b, a
        return f"What is {a}*{b}?", str(a * b)
    if skill == "reverse":
        w = _word(rng, 3, 5)
        return f"Reverse the word '{w}'.", w[::-1]
    if skill == "sort":
        w = _word(rng, 3, 5)
        return f"Sort the letters of '{w}'.", "".join(sorted(w))
    if skill == "count":
        w = _word(rng, 2, 8)
        return f"How many letters are in '{w}'?", str(len(w))
    raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")


def make_questions(n: int, seed: int = 0, split: str = "test", skills=SKILLS) -> list[Question]:
    """``n`` questions of ``split`` ('test' or 'train'), skills in round-robin order.

    Deterministic in (n, seed, split, skills); the test split has no duplicates.
    """
    if split not in ("test", "train"):
        raise ValueError("split must be 'test' or 'train'")
    rng = random.Random(f"bitserve-demo/{split}/{seed}")
    seen: set[str] = set()
    out: list[Question] = []
    for i in range(n):
        skill = skills[i % len(skills)]
        for _ in range(100_000):
            text, answer = make_question(skill, rng)
            if split_of(text) == split and not (split == "test" and text in seen):
                break
        else:
            raise ValueError(f"the {split} split has too few distinct {skill!r} questions for n={n}")
        seen.add(text)
        out.append(Question([{"role": "user", "content": text}], answer, skill))
    return out


def check(question: Question, reply_text: str) -> bool:
    """True iff the reply is exactly the answer (surrounding whitespace and a final '.' ignored)."""
    reply = reply_text.strip()
    if reply.endswith("."):
        reply = reply[:-1].rstrip()
    return reply == question.answer
