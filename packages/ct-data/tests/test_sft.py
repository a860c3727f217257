"""SFT: chat template, assistant-only labels, multi-turn, truncation policies, packing, GSM8K."""

import json
import random
from collections import Counter

import pytest

from ct_data import SourceConfig, build_sft_loader, extract_gsm8k_answer
from ct_data.sample import REASONING_SYSTEM_PROMPT
from ctdata_helpers import GSM8K_DIR, write_jsonl


def conversations(n, seed=0, long_every=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": "You help."})
        for turn in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": f"question {i}.{turn}: " + "why " * rng.randint(1, 8)})
            words = rng.randint(1, 12) * (30 if long_every and i % long_every == 0 and turn == 0 else 1)
            msgs.append({"role": "assistant", "content": f"answer {i}.{turn}: " + "because " * words})
        out.append(msgs)
    return out


def assistant_text(msgs):
    return "".join(m["content"].strip() + "<|eot_id|>" for m in msgs if m["role"] == "assistant")


def docs_of(batch, row):
    """(ids, labels) of each document in a packed row; padding checked on the way."""
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    pos, doc = batch["position_ids"][row].tolist(), batch["document_ids"][row].tolist()
    out = {}
    for i, d in enumerate(doc):
        if d == -1:
            assert labels[i] == -100
            continue
        out.setdefault(d, ([], []))
        out[d][0].append(ids[i])
        out[d][1].append(labels[i])
    pad = [i for i, d in enumerate(doc) if d == -1]
    if pad:
        assert pad == list(range(pad[0], len(doc)))  # padding only at the end
        assert pos[pad[0]:] == list(range(len(pad)))
    for d, (di, _) in out.items():
        assert [pos[i] for i, x in enumerate(doc) if x == d] == list(range(len(di)))
    return list(out.values())


def test_assistant_only_labels_and_packing(tmp_path, tokenizer):
    convs = conversations(60)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    B, T = 2, 256
    loader = build_sft_loader([SourceConfig("chat", str(tmp_path / "chat.jsonl"))], tokenizer, T, B, seed=0,
                              prefetch=0)
    by_ids = {tuple(tokenizer.encode(tokenizer.render_chat(m))): m for m in convs}
    seen = Counter()
    real = 0
    for _ in range(40):
        b = next(loader)
        real += int((b["document_ids"] != -1).sum())
        for row in range(B):
            for ids, labels in docs_of(b, row):
                msgs = by_ids[tuple(ids)]  # every document is exactly one rendered conversation
                seen[tuple(ids)] += 1
                for t in range(len(ids) - 1):
                    assert labels[t] in (-100, ids[t + 1])
                assert labels[-1] == -100
                targets = [lab for lab in labels if lab != -100]
                assert tokenizer.decode(targets) == assistant_text(msgs)
    # 40 steps of 2 x 256 tokens go through every conversation that fits; the others are counted.
    fits = [m for m in convs if len(tokenizer.encode(tokenizer.render_chat(m))) <= T]
    assert len(seen) == len(fits)
    assert loader.stats()["sources"]["chat"]["skipped"].get("too_long", 0) > 0 or len(fits) == len(convs)
    eff = loader.stats()["packing_efficiency"]
    assert eff == real / (40 * B * T)
    assert eff > 0.85  # examples of up to a whole row, packed from a 16-example look-ahead


def test_full_sequence_loss(tmp_path, tokenizer):
    convs = conversations(10)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    loader = build_sft_loader([SourceConfig("chat", str(tmp_path / "chat.jsonl"))], tokenizer, 128, 1, seed=0,
                              loss_on="all", prefetch=0)
    for ids, labels in docs_of(next(loader), 0):
        assert labels == ids[1:] + [-100]


def test_in_order_lookahead_one_and_no_packing(tmp_path, tokenizer):
    convs = conversations(12)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    src = [SourceConfig("chat", str(tmp_path / "chat.jsonl"))]
    refs = [tokenizer.encode(tokenizer.render_chat(m)) for m in convs]
    assert max(map(len, refs)) <= 256
    loader = build_sft_loader(src, tokenizer, 256, 1, seed=0, lookahead=1, prefetch=0)
    got = [ids for _ in range(12) for ids, _ in docs_of(next(loader), 0)]
    assert len(got) > 12 and got == [refs[i % 12] for i in range(len(got))]
    loader = build_sft_loader(src, tokenizer, 256, 2, seed=0, packing="none", prefetch=0)
    for step in range(3):
        b = next(loader)
        for row in range(2):
            docs = docs_of(b, row)
            assert len(docs) == 1 and docs[0][0] == refs[(row + 2 * step) % 12]


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_truncation_policies(tmp_path, tokenizer, policy):
    convs = conversations(30, seed=1, long_every=5)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs])
    T = 96
    lengths = [len(tokenizer.encode(tokenizer.render_chat(m))) for m in convs]
    n_long = sum(n > T for n in lengths)
    assert n_long >= 3
    loader = build_sft_loader([SourceConfig("chat", str(tmp_path / "chat.jsonl"))], tokenizer, T, 1, seed=0,
                              truncation=policy, on_exhausted="stop", lookahead=1, prefetch=0)
    docs = [d for b in loader for d in docs_of(b, 0)]
    st = loader.stats()["sources"]["chat"]
    if policy == "drop":
        assert st["skipped"] == {"too_long": n_long} and len(docs) == 30 - n_long
    else:
        assert st["truncated"] == n_long and st["skipped"] == {} and len(docs) == 30
        for (ids, labels), m in zip(docs, convs):
            full = tokenizer.encode(tokenizer.render_chat(m))
            assert ids == full[:T]  # the prompt and the start of the answer are kept
            targets = tokenizer.decode([lab for lab in labels if lab != -100])
            assert assistant_text(m).startswith(targets) and targets


def test_prompt_response_fields(tmp_path, tokenizer):
    rows = [{"q": f"What is {i} + 1?", "a": f"{i} + 1 = {i + 1}.\n\\boxed{{{i + 1}}}"} for i in range(5)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    src = SourceConfig("qa", str(tmp_path / "qa.jsonl"), prompt_field="q", response_field="a",
                       system_prompt=REASONING_SYSTEM_PROMPT)
    loader = build_sft_loader([src], tokenizer, 512, 1, seed=0, lookahead=1, prefetch=0)
    docs = docs_of(next(loader), 0)
    for (ids, labels), r in zip(docs, rows):
        msgs = [{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": r["q"]},
                {"role": "assistant", "content": r["a"]}]
        assert ids == tokenizer.encode(tokenizer.render_chat(msgs))
        assert tokenizer.decode([x for x in labels if x != -100]) == r["a"] + "<|eot_id|>"


def test_bad_conversations_are_counted(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good, {"messages": "not a list"}, {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": None}, {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    loader = build_sft_loader([SourceConfig("c", str(tmp_path / "c.jsonl"))], tokenizer, 64, 1, seed=0,
                              on_exhausted="stop", prefetch=0)
    assert len([d for b in loader for d in docs_of(b, 0)]) == 1
    assert loader.stats()["sources"]["c"]["skipped"] == {"bad_messages": 3, "empty": 1, "non_string": 1}


@pytest.mark.parametrize("empty", ["", "   \n"])
def test_an_empty_assistant_turn_is_context_and_the_other_turns_train(tmp_path, tokenizer, empty):
    """One rule in the loader and in encode_chat_with_mask: a conversation with an empty assistant
    turn followed by a non-empty one is kept; the empty turn is rendered but not trained, the
    non-empty one is. A conversation whose only assistant turn is empty is dropped (bad_messages)."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": empty},
            {"role": "user", "content": "again?"}, {"role": "assistant", "content": "hello there"}]
    only_empty = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": empty}]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}, {"messages": only_empty}])
    loader = build_sft_loader([SourceConfig("c", str(tmp_path / "c.jsonl"))], tokenizer, 128, 1, seed=0,
                              on_exhausted="stop", prefetch=0)
    docs = [d for b in loader for d in docs_of(b, 0)]
    assert loader.stats()["sources"]["c"]["skipped"] == {"bad_messages": 1}
    assert len(docs) == 1
    ids, labels = docs[0]
    cleaned = [{**m, "content": m["content"].strip()} for m in msgs]
    assert ids == tokenizer.encode(tokenizer.render_chat(cleaned))
    assert tokenizer.decode([x for x in labels if x != -100]) == "hello there<|eot_id|>"
    # encode_chat_with_mask applies the same rule: only the non-empty turn's tokens are trained.
    enc, mask = tokenizer.encode_chat_with_mask(msgs)
    assert tokenizer.decode([t for t, m in zip(enc, mask) if m]) == "hello there<|eot_id|>"


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason=f"GSM8K data not found at {GSM8K_DIR} (only on the dev machines)")
def test_gsm8k_through_sft_loader(tokenizer):
    src = SourceConfig("gsm8k", str(GSM8K_DIR / "train.jsonl"), prompt_field="question", response_field="answer",
                       system_prompt=REASONING_SYSTEM_PROMPT)
    loader = build_sft_loader([src], tokenizer, 1024, 2, seed=0, lookahead=1, prefetch=0)
    with open(GSM8K_DIR / "train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(40)]
    b = next(loader)
    docs = docs_of(b, 0)
    assert len(docs) >= 2
    for k, (ids, labels) in enumerate(docs):
        r = rows[2 * k]  # row 0 of a global batch of 2 takes records 0, 2, 4, ...
        assert tokenizer.decode([x for x in labels if x != -100]) == r["answer"].strip() + "<|eot_id|>"
        assert r["question"].strip() in tokenizer.decode(ids)
    assert extract_gsm8k_answer(rows[0]["answer"]) == "72"
    with open(GSM8K_DIR / "test.jsonl") as f:
        answers = [extract_gsm8k_answer(json.loads(line)["answer"]) for line in f]
    assert len(answers) == 1319 and all(a is not None and float(a) == float(a) for a in answers)
