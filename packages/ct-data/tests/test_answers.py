from ct_data import answers_match, extract_boxed_answer, extract_gsm8k_answer, normalize_answer
from ct_data.answers import extract_final_answer


def test_boxed():
    assert extract_boxed_answer("so \\boxed{12}.") == "12"
    assert extract_boxed_answer("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed_answer("\\boxed{12") is None
    assert extract_boxed_answer("no box") is None


def test_gsm8k():
    assert extract_gsm8k_answer("48/2 = 24\n#### 72") == "72"
    assert extract_gsm8k_answer("#### 1,000") == "1000"
    assert extract_gsm8k_answer("#### $5.50") == "5.5"
    assert extract_gsm8k_answer("#### -3") == "-3"
    assert extract_gsm8k_answer("no marker") is None


def test_normalize_and_match():
    assert normalize_answer(" 72. ") == "72"
    assert normalize_answer("7.0") == "7"
    assert answers_match("1,000", "1000") and answers_match("0.50", ".5")
    assert not answers_match("71", "72") and not answers_match(None, "1")
    assert extract_final_answer("it is 5 then 6") == "6"
    assert extract_final_answer("x \\boxed{8} #### 9") == "8"


# Hand-written cases: (model output, reference answer, should match).
CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "1/2", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "0.5", True),
    ("\\boxed{1,000}", "1000", True),
    ("The total is $\\boxed{-3}$.", "-3", True),
    ("\\boxed{ 42 }", "42", True),
    ("\\boxed{42} because 6 x 7 = 42, and that is it.", "42", True),
    ("first \\boxed{7}, no wait: \\boxed{8}", "8", True),
    ("first \\boxed{7}, no wait: \\boxed{8}", "7", False),
    ("\\boxed{\\text{12}}", "12", True),
    ("\\boxed{12 \\text{ apples}}", "12", False),  # units are not stripped: strict, as graders are
    ("\\boxed{\\frac{2}{4}}", "1/2", True),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", True),
    ("\\boxed{2.50}", "2.5", True),
    ("\\boxed{3}", "\\frac{1}{3}", False),
    ("\\boxed{x+1}", "x + 1", False),
    ("\\boxed{x+1}", "x+1", True),
    ("no box at all: 42", "42", False),
    ("\\boxed{12", "12", False),  # cut off mid-box
]


def test_answer_extraction_table():
    import pytest

    for output, reference, expected in CASES:
        got = answers_match(extract_boxed_answer(output), reference)
        assert got == expected, pytest.fail(f"{output!r} vs {reference!r}: got {got}, expected {expected}")
