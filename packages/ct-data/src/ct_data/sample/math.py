"""Arithmetic word problems with short worked solutions ending in ``\\boxed{N}``.

Small numbers, one or two steps, a handful of sentence templates: learnable by a few-million-parameter
model in minutes on a CPU. Each problem's identity is its (template, numbers) key; a fixed hash of
the key, independent of the seed, puts 10% of all keys in the held-out evaluation split, so no
evaluation problem (in any wording) ever appears in training data built with any seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

REASONING_SYSTEM_PROMPT = "Please reason step-by-step and put your final answer within \\boxed{}."
EVAL_FRACTION_MOD = 10  # one key in ten is held out

NAMES = [
    ("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"), ("Emma", "She"),
    ("Leo", "He"), ("Nora", "She"), ("Max", "He"), ("Zoe", "She"), ("Jack", "He"), ("Ava", "She"),
    ("Omar", "He"), ("Sara", "She"), ("Ivan", "He"), ("Lena", "She"), ("Raj", "He"), ("Anna", "She"),
]
ITEMS = ["apples", "marbles", "pencils", "stickers", "books", "cookies", "coins", "shells", "cards",
         "stamps", "flowers", "eggs", "candies", "beads", "toy cars", "balloons"]


@dataclass(frozen=True)
class Problem:
    template: int
    numbers: tuple[int, ...]
    question: str
    solution: str  # worked steps, last line \boxed{answer}
    answer: int

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        return (self.template, self.numbers)

    def text(self) -> str:
        """The problem as one pretraining document."""
        return f"{self.question}\n{self.solution}"

    def chat(self) -> list[dict[str, str]]:
        """The reasoning-SFT conversation for this problem."""
        return [
            {"role": "system", "content": REASONING_SYSTEM_PROMPT},
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.solution},
        ]


def is_eval_key(template: int, numbers: tuple[int, ...]) -> bool:
    h = hashlib.sha256(f"{template}:{','.join(map(str, numbers))}".encode()).digest()
    return int.from_bytes(h[:8], "big") % EVAL_FRACTION_MOD == 0


def _digits(n: int) -> list[int]:
    """Digits least-significant first (the order the column work runs in)."""
    return [int(c) for c in reversed(str(n))]


def columns(a: int, op: str, b: int) -> list[str]:
    """Column work of ``a op b``, units column first, as the model should write it.

    A few-million-parameter model does not learn 2-digit carries from "49 - 16 = 33" alone (the
    11.5% run); one single-digit fact per column, carry or borrow written out, is learnable. Empty
    for products of two multi-digit numbers (few, memorised).
    """
    if op == "*":
        x, m = (a, b) if b < 10 else (b, a)
        if m >= 10:
            return []
    cols, carry = [], 0
    xs, ys = (_digits(x), [m]) if op == "*" else (_digits(a), _digits(b))
    for i, dx in enumerate(xs):
        extra = f"+{carry}" if carry and op != "-" else f"-{carry}" if carry else ""
        if op == "*":
            s = m * dx + carry
            cols.append(f"{dx}*{m}{extra}={s}" if x == a else f"{m}*{dx}{extra}={s}")
        else:
            dy = ys[i] if i < len(ys) else 0
            if op == "+":
                s = dx + dy + carry
                cols.append(f"{dx}+{dy}{extra}={s}")
            else:
                need = 10 if dx - dy - carry < 0 else 0  # borrow from the next column
                s = dx + need - dy - carry
                cols.append(f"{dx + need}-{dy}{extra}={s}")
        carry = (s // 10) if op != "-" else (1 if need else 0)
    if op == "+" and len(ys) > len(xs):
        raise ValueError("columns: the first operand must be the longer one")
    return cols


def _op(a: int, op: str, b: int) -> str:
    """One arithmetic step, ``a op b = (column work) r``; the result stays in normal digit order."""
    if op == "+" and len(str(b)) > len(str(a)):
        work = columns(b, op, a)  # longer number on top, as on paper
    else:
        work = columns(a, op, b)
    r = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = ({', '.join(work)}) {r}" if work else f"{a} {op} {b} = {r}"


def _boxed(steps: list[str], r: int) -> str:
    return "\n".join(steps + [f"\\boxed{{{r}}}"])


# Each template: (numbers sampler, renderer(numbers, name, pron, name2, item) -> (question, steps, answer))
def _t_add(rng):
    return rng.randint(1, 50), rng.randint(1, 50)


def _r_add(n, name, pron, name2, item):
    a, b = n
    r = a + b
    return (f"{name} has {a} {item}. {pron} gets {b} more. How many {item} does {name} have now?",
            [f"{name} has {a} {item} and gets {b} more.", f"{_op(a, '+', b)}."], r)


def _t_sub(rng):
    a = rng.randint(2, 60)
    return a, rng.randint(1, a - 1)


def _r_sub(n, name, pron, name2, item):
    a, b = n
    r = a - b
    return (f"{name} has {a} {item}. {pron} gives {b} to a friend. How many {item} are left?",
            [f"{name} gives away {b} of the {a} {item}.", f"{_op(a, '-', b)}."], r)


def _t_mul(rng):
    return rng.randint(2, 12), rng.randint(2, 12)


def _r_mul(n, name, pron, name2, item):
    a, b = n
    r = a * b
    return (f"There are {a} boxes. Each box holds {b} {item}. How many {item} are there in all?",
            [f"There are {a} boxes with {b} {item} each.", f"{_op(a, '*', b)}."], r)


def _t_cmp(rng):
    a = rng.randint(2, 60)
    return a, rng.randint(1, a - 1)


def _r_cmp(n, name, pron, name2, item):
    a, b = n
    r = a - b
    return (f"{name} has {a} {item} and {name2} has {b} {item}. How many more {item} does {name} have "
            f"than {name2}?", [f"{name} has {a} and {name2} has {b}.", f"{_op(a, '-', b)}."], r)


def _r_both(n, name, pron, name2, item):
    a, b = n
    r = a + b
    return (f"{name} has {a} {item} and {name2} has {b} {item}. How many {item} do they have together?",
            [f"Together they have {_op(a, '+', b)}."], r)


def _t_add_sub(rng):
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    return a, b, rng.randint(1, a + b)


def _r_add_sub(n, name, pron, name2, item):
    a, b, c = n
    d = a + b
    r = d - c
    return (f"{name} has {a} {item}. {pron} buys {b} more and then gives {c} away. How many {item} does "
            f"{name} have now?", [f"First, {_op(a, '+', b)}.", f"Then, {_op(d, '-', c)}."], r)


def _t_mul_add(rng):
    return rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)


def _r_mul_add(n, name, pron, name2, item):
    a, b, c = n
    d = a * b
    r = d + c
    return (f"{name} buys {a} bags with {b} {item} in each bag. {pron} already had {c} {item}. How many "
            f"{item} does {name} have now?", [f"The bags hold {_op(a, '*', b)} {item}.", f"Then, {_op(d, '+', c)}."], r)


def _t_mul_sub(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return a, b, rng.randint(1, a * b - 1)


def _r_mul_sub(n, name, pron, name2, item):
    a, b, c = n
    d = a * b
    r = d - c
    return (f"{name} has {a} packs of {b} {item}. {pron} gives away {c} {item}. How many {item} are left?",
            [f"{name} has {_op(a, '*', b)} {item}.", f"Then, {_op(d, '-', c)}."], r)


def _t_double(rng):
    return (rng.randint(1, 50),)


def _r_double(n, name, pron, name2, item):
    (a,) = n
    r = 2 * a
    return (f"{name} has {a} {item}. {name2} has twice as many {item}. How many {item} does {name2} have?",
            [f"{name2} has {_op(2, '*', a)}."], r)


TEMPLATES: list[tuple[Callable, Callable]] = [
    (_t_add, _r_add),
    (_t_sub, _r_sub),
    (_t_mul, _r_mul),
    (_t_cmp, _r_cmp),
    (_t_add, _r_both),
    (_t_add_sub, _r_add_sub),
    (_t_mul_add, _r_mul_add),
    (_t_mul_sub, _r_mul_sub),
    (_t_double, _r_double),
]


def make_problem(rng: random.Random, template: int, numbers: tuple[int, ...]) -> Problem:
    (name, pron), (name2, _) = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    q, steps, r = TEMPLATES[template][1](numbers, name, pron, name2, item)
    return Problem(template, numbers, q, _boxed(steps, r), r)


def problems(seed: int, split: str) -> Iterator[Problem]:
    """Endless problems of one split ("train" or "eval"), deterministic for a seed.

    The eval stream never repeats a key.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"ct_data.math:{seed}:{split}")
    want_eval = split == "eval"
    seen: set = set()
    while True:
        t = rng.randrange(len(TEMPLATES))
        numbers = tuple(TEMPLATES[t][0](rng))
        if is_eval_key(t, numbers) != want_eval:
            continue
        if want_eval:
            if (t, numbers) in seen:
                continue
            seen.add((t, numbers))
        yield make_problem(rng, t, numbers)
