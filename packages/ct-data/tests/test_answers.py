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
