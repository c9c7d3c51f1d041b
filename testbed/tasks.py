"""The task catalogue: 25 skills over four distinct symbols, in five families.

Every prompt is ``"<task> x1 x2 x3 x4 ="`` with four distinct symbols from
``a``..``p`` (read as the numbers 0..15 by the arithmetic tasks). Answers are
symbols (``string``, ``arithmetic``, ``lookup``, ``short`` families: scored by
exact match after greedy generation) or one word out of a fixed or per-item set of
choices (``choice`` family: scored by log-likelihood, lm-eval's multiple choice).

The catalogue is fixed before any method is scored; a test checks that the skills
are distinct (no two generation tasks agree on most inputs) and that the choice
tasks are not dominated by one label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SYMBOLS: Tuple[str, ...] = tuple(chr(ord("a") + i) for i in range(16))
LENGTH = 4
COUNT_WORDS = ("zero", "one", "two", "three", "four")
Seq = Sequence[str]


def value(symbol: str) -> int:
    return SYMBOLS.index(symbol)


def symbol(number: int) -> str:
    return SYMBOLS[number % len(SYMBOLS)]


@dataclass(frozen=True)
class Task:
    """One skill. ``answer`` (generation) or ``options`` (choice: the choices and
    the gold index) maps four symbols to what the model must produce."""

    name: str
    family: str  # string | arithmetic | lookup | short | choice
    answer: Optional[Callable[[Seq], List[str]]] = None
    options: Optional[Callable[[Seq], Tuple[List[str], int]]] = None

    @property
    def kind(self) -> str:
        return "choice" if self.options is not None else "generate"

    def prompt(self, seq: Seq) -> str:
        return f"{self.name} {' '.join(seq)} ="

    def completion(self, seq: Seq) -> str:
        if self.options is not None:
            choices, gold = self.options(seq)
            return choices[gold]
        return " ".join(self.answer(seq))  # type: ignore[misc]

    def answer_tokens(self) -> int:
        """Words in an answer (generation budget for lm-eval)."""
        probe = SYMBOLS[:LENGTH]
        return 1 if self.options is not None else len(self.answer(probe))  # type: ignore[misc]


def _cipher_table(seed: int = 20251) -> Dict[str, str]:
    """A fixed substitution of the 16 symbols (the lookup task's secret table)."""
    shuffled = list(SYMBOLS)
    random.Random(seed).shuffle(shuffled)
    return dict(zip(SYMBOLS, shuffled))


_CIPHER = _cipher_table()


def _running_sum(x: Seq) -> List[str]:
    total, out = 0, []
    for s in x:
        total += value(s)
        out.append(symbol(total))
    return out


def _which_max(x: Seq) -> Tuple[List[str], int]:
    choices = list(x)
    return choices, max(range(LENGTH), key=lambda i: value(x[i]))


TASKS: Tuple[Task, ...] = (
    # string: rearrangements
    Task("reverse", "string", answer=lambda x: list(reversed(x))),
    Task("sort", "string", answer=lambda x: sorted(x, key=value)),
    Task("sortdesc", "string", answer=lambda x: sorted(x, key=value, reverse=True)),
    Task("rotate", "string", answer=lambda x: list(x[1:]) + [x[0]]),
    Task("rotateright", "string", answer=lambda x: [x[-1]] + list(x[:-1])),
    Task("swappairs", "string", answer=lambda x: [x[1], x[0], x[3], x[2]]),
    Task("swapends", "string", answer=lambda x: [x[3], x[1], x[2], x[0]]),
    Task("interleave", "string", answer=lambda x: [x[0], x[2], x[1], x[3]]),
    Task("copy", "string", answer=lambda x: list(x)),
    Task("mirror", "string", answer=lambda x: [symbol(15 - value(s)) for s in x]),
    # arithmetic on the symbols' values, mod 16
    Task("shiftup", "arithmetic", answer=lambda x: [symbol(value(s) + 1) for s in x]),
    Task("shiftdown", "arithmetic", answer=lambda x: [symbol(value(s) - 1) for s in x]),
    Task("double", "arithmetic", answer=lambda x: [symbol(2 * value(s)) for s in x]),
    Task("addpairs", "arithmetic", answer=lambda x: [symbol(value(x[0]) + value(x[1])), symbol(value(x[2]) + value(x[3]))]),
    Task("runningsum", "arithmetic", answer=_running_sum),
    Task("diffs", "arithmetic", answer=lambda x: [symbol(value(x[i + 1]) - value(x[i])) for i in range(LENGTH - 1)]),
    # lookup: a fixed table the model must have memorised
    Task("cipher", "lookup", answer=lambda x: [_CIPHER[s] for s in x]),
    Task("argmin", "lookup", answer=lambda x: [SYMBOLS[min(range(LENGTH), key=lambda i: value(x[i]))]]),
    # short generation
    Task("firstlast", "short", answer=lambda x: [x[0], x[-1]]),
    Task("min", "short", answer=lambda x: [min(x, key=value)]),
    Task("max", "short", answer=lambda x: [max(x, key=value)]),
    # classification-style multiple choice
    Task("firstlow", "choice", options=lambda x: (["no", "yes"], int(value(x[0]) < 8))),
    Task("firstbigger", "choice", options=lambda x: (["no", "yes"], int(value(x[0]) > value(x[-1])))),
    Task("countlow", "choice", options=lambda x: (list(COUNT_WORDS), sum(value(s) < 8 for s in x))),
    Task("whichmax", "choice", options=_which_max),
)
BY_NAME: Dict[str, Task] = {task.name: task for task in TASKS}


def words() -> List[str]:
    """Every word a prompt or answer can contain (the tokenizer's vocabulary)."""
    out = list(SYMBOLS) + ["="] + [task.name for task in TASKS]
    for task in TASKS:
        if task.options is not None:
            for word in task.options(SYMBOLS[:LENGTH])[0]:
                if word not in out:
                    out.append(word)
    for word in ("no", "yes", *COUNT_WORDS):
        if word not in out:
            out.append(word)
    return out


def split_of(seq: Seq) -> str:
    """A fixed, disjoint split of all symbol sequences: 10% test, 10% calibration, 80% train."""
    h = sum((i + 7) * (value(s) + 3) for i, s in enumerate(seq)) % 10
    return "test" if h == 0 else "calib" if h == 1 else "train"


def sequences(rng: random.Random, split: str, n: int) -> List[Tuple[str, ...]]:
    out: List[Tuple[str, ...]] = []
    while len(out) < n:
        seq = tuple(rng.sample(SYMBOLS, LENGTH))
        if split_of(seq) == split:
            out.append(seq)
    return out
