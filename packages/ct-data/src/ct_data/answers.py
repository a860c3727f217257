"""Final answers of math solutions: ``\\boxed{...}`` (the recipe's format) and GSM8K's ``#### N``."""

from __future__ import annotations

import re
from fractions import Fraction

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


_LATEX_NOISE = ("\\!", "\\,", "\\;", "\\left", "\\right", "\\displaystyle")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")


def normalize_answer(answer: str) -> str:
    """Strip spaces, ``$``, LaTeX spacing, ``\\text{}`` wrappers, thousands separators and a trailing
    period; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; integral numbers as integers."""
    a = answer.strip().replace("$", "")
    for noise in _LATEX_NOISE:
        a = a.replace(noise, "")
    a = _TEXT.sub(lambda m: m.group(1), a)
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    a = a.strip().rstrip(".").strip()
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


def numeric_value(answer: str) -> Fraction | None:
    """The exact value of a number, ``a/b`` or ``\\frac{a}{b}`` (after normalisation), else None."""
    a = normalize_answer(answer).replace(" ", "")
    frac = _FRAC.match(a)
    if frac:
        sign, num, den = frac.groups()
        a = f"{sign}{num}/{den}"
    try:
        if "/" in a:
            num, den = a.split("/", 1)
            value = Fraction(Fraction(num), Fraction(den))
        else:
            value = Fraction(a.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Equal after normalisation, or equal as numbers where both parse (``0.5`` = ``1/2`` =
    ``\\frac{1}{2}``; decimals compared to 1e-9 relative)."""
    if predicted is None or reference is None:
        return False
    p, r = normalize_answer(predicted), normalize_answer(reference)
    if p == r:
        return True
    pv, rv = numeric_value(p), numeric_value(r)
    if pv is None or rv is None:
        return False
    return pv == rv or abs(float(pv) - float(rv)) <= 1e-9 * max(1.0, abs(float(rv)))
