"""Final answers of math solutions: ``\\boxed{...}`` (the recipe's format) and GSM8K's ``#### N``."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    if not isinstance(text, str):
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: the generation was cut off


def extract_gsm8k_answer(text: str) -> str | None:
    """GSM8K's final answer: what follows the last ``####``, normalised (``"1,000"`` -> ``"1000"``)."""
    if not isinstance(text, str) or "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    if not tail:
        return None
    return normalize_answer(tail.splitlines()[0])


def extract_final_answer(text: str) -> str | None:
    """``\\boxed{}`` if present, else GSM8K's ``####``, else the last number in the text."""
    for f in (extract_boxed_answer, extract_gsm8k_answer):
        a = f(text)
        if a is not None:
            return normalize_answer(a)
    nums = _NUMBER.findall(text or "")
    return normalize_answer(nums[-1]) if nums else None


def normalize_answer(answer: str) -> str:
    """Strip spaces, ``$``, thousands separators and a trailing period; integral numbers as integers."""
    a = answer.strip().replace("$", "").replace("\\!", "").strip()
    a = a.rstrip(".").strip()
    if re.fullmatch(r"[+-]?[\d,]*\.?\d+", a):
        a = a.replace(",", "").lstrip("+")
        try:
            v = float(a)
        except ValueError:
            return a
        if v.is_integer():
            return str(int(v))
        return repr(v)
    return a


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Exact match after normalisation (numbers compared as numbers)."""
    if predicted is None or reference is None:
        return False
    p, r = normalize_answer(predicted), normalize_answer(reference)
    if p == r:
        return True
    try:
        return abs(float(p) - float(r)) <= 1e-9 * max(1.0, abs(float(r)))
    except ValueError:
        return False
