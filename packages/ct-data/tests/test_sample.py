"""The embedded sample corpus: deterministic, read through the real source path, math held out."""

import json
import re

import pyarrow.parquet as pq

from ct_data import build_pretrain_loader, build_sft_loader, extract_boxed_answer, sample
from ct_data.sample import REASONING_SYSTEM_PROMPT


def test_same_seed_same_bytes(tmp_path, sample_dir):
    again = sample.build(tmp_path / "again", seed=0, scale=0.05)
    other = sample.build(tmp_path / "other", seed=1, scale=0.05)
    for name, rel in sample.FILES.items():
        assert (sample_dir / rel).read_bytes() == open(again[name], "rb").read(), name
    assert (sample_dir / sample.FILES["math"]).read_bytes() != open(other["math"], "rb").read()
    man = json.loads((sample_dir / "manifest.json").read_text())
    assert man["seed"] == 0 and set(man["files"]) == set(sample.FILES.values())


def test_build_is_cached(tmp_path):
    d = tmp_path / "s"
    sample.build(d, seed=3, scale=0.02)
    stamp = (d / sample.FILES["code"]).stat().st_mtime_ns
    sample.build(d, seed=3, scale=0.02)
    assert (d / sample.FILES["code"]).stat().st_mtime_ns == stamp  # not rewritten
    (d / sample.FILES["math"]).write_text("tampered\n")
    sample.build(d, seed=3, scale=0.02)
    assert (d / sample.FILES["math"]).read_text() != "tampered\n"  # a damaged file is rebuilt


def check_columns(solution: str) -> str:
    """Verify the column work "a op b = (cols) c": each column's arithmetic, units column first, and
    that the column results spell c. Returns the solution with the column work removed."""
    for op, work, c in re.findall(r"\d+ ([+\-*]) \d+ = \(([^)]*)\) (\d+)", solution):
        sums = []
        for col in work.split(", "):
            expr, s = col.split("=")
            assert eval(expr) == int(s), (col, solution)  # e.g. "4-1-1" == 2
            sums.append(int(s))
        if op == "-":
            spelled = "".join(str(s) for s in reversed(sums)).lstrip("0") or "0"
        else:  # the last column keeps its carry, the others give their units digit
            spelled = str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1]))
        assert spelled == c, solution
    return re.sub(r" = \([^)]*\)", " =", solution)


def check_solution(question: str, solution: str, answer: int) -> None:
    """Verify every 'a op b = c' step independently and that the boxed answer is the last result."""
    solution = check_columns(solution)
    steps = re.findall(r"(\d+) ([+\-*]) (\d+) = (\d+)", solution)
    assert steps, solution
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, solution
    assert int(steps[-1][3]) == answer
    assert solution.splitlines()[-1] == f"\\boxed{{{answer}}}"
    assert extract_boxed_answer(solution) == str(answer)
    # Operands come from the question (or "twice" = 2) or from an earlier step.
    known = {int(x) for x in re.findall(r"\d+", question)} | ({2} if "twice" in question else set())
    for a, _, b, c in steps:
        assert int(a) in known and int(b) in known, (question, solution)
        known.add(int(c))


def test_math_is_correct_and_eval_is_held_out(sample_dir):
    train = [json.loads(x) for x in open(sample_dir / sample.FILES["math"])]
    evals = sample.load_math_eval(sample_dir)
    assert len(evals) >= 20 and len(train) >= 500
    for p in train:
        check_solution(p["question"], p["solution"], p["answer"])
        assert p["text"] == p["question"] + "\n" + p["solution"]
    for p in evals:
        check_solution(p["question"], p["solution"], p["answer"])
        assert isinstance(p["answer"], int)

    def numbers(q):  # the problem's identity up to names and objects: its wording skeleton and numbers
        return re.sub(r"[A-Z][a-z]+|toy cars|[a-z]+s\b", "_", q), tuple(re.findall(r"\d+", q))

    train_keys = {numbers(p["question"]) for p in train}
    assert not any(numbers(p["question"]) in train_keys for p in evals)
    assert len({p["question"] for p in evals}) == len(evals)
    # The split is by a fixed hash of (template, numbers): larger builds and other seeds keep it.
    big = list(zip(range(3000), sample.problems(7, "train")))
    assert not any(sample.is_eval_key(*p.key) for _, p in big)
    assert all(sample.is_eval_key(*p.key) for _, p in zip(range(300), sample.problems(7, "eval")))


def test_sft_files(sample_dir):
    general = [json.loads(x)["messages"] for x in open(sample_dir / sample.FILES["sft_general"])]
    reasoning = pq.read_table(sample_dir / sample.FILES["sft_reasoning"]).column("messages").to_pylist()
    assert general and reasoning
    assert any(sum(m["role"] == "assistant" for m in c) == 2 for c in general)  # some are multi-turn
    for c in reasoning:
        assert [m["role"] for m in c] == ["system", "user", "assistant"]
        assert c[0]["content"] == REASONING_SYSTEM_PROMPT
        assert extract_boxed_answer(c[2]["content"]) is not None


def test_sample_through_the_loaders(sample_dir, tokenizer):
    loader = build_pretrain_loader(sample.pretrain_sources(sample_dir), tokenizer, 128, 4, seed=0)
    for _ in range(5):
        next(loader)
    st = loader.stats()
    assert st["packing_efficiency"] >= 0.99
    assert all(s["docs"] > 0 for s in st["sources"].values())
    sft = build_sft_loader(sample.sft_sources(sample_dir, "both"), tokenizer, 256, 2, seed=0)
    b = next(sft)
    assert (b["labels"] != -100).any()


def test_tokenizer_from_sample(sample_dir, tmp_path):
    tok = sample.build_tokenizer(sample_dir, vocab_size=2048, out_dir=tmp_path / "tok", max_chars=300_000)
    assert tok.vocab_size <= 2048
    again = sample.build_tokenizer(sample_dir, vocab_size=2048, out_dir=tmp_path / "tok", max_chars=300_000)
    text = "Tom has 3 apples. He gets 4 more.\n3 + 4 = 7.\n\\boxed{7}"
    assert again.encode(text) == tok.encode(text) and tok.decode(tok.encode(text)) == text
