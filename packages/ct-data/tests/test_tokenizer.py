import json

import pytest

from ct_data import LLAMA3_SPECIAL_TOKENS, load_tokenizer, train_tokenizer


def test_train_and_reload(tmp_path, tokenizer):
    texts = ["hello world, this is a test of the tokenizer."] * 50 + ["def f(x):\n    return x + 1\n"] * 50
    tok = train_tokenizer(texts, 400, tmp_path / "t")
    assert tok.vocab_size <= 400
    again = load_tokenizer(tmp_path / "t")
    s = "hello world\n\tdef f(x): return 12345 + ünïcödé ☃"
    assert again.encode(s) == tok.encode(s)
    assert again.decode(again.encode(s)) == s  # byte-level: every string round-trips
    for name in ("bos_id", "eos_id", "pad_id", "eot_id", "vocab_size"):
        assert getattr(again, name) == getattr(tok, name)
    # Every LLaMA-3 special token is one token, with the roles of the real tokenizer.
    for t in LLAMA3_SPECIAL_TOKENS:
        assert len(tok.encode(t)) == 1
    assert tok.id_to_token(tok.bos_id) == "<|begin_of_text|>"
    assert tok.id_to_token(tok.eos_id) == "<|end_of_text|>"
    assert tok.id_to_token(tok.eot_id) == "<|eot_id|>"
    assert tok.id_to_token(tok.pad_id) == "<|finetune_right_pad_id|>"
    assert tok.encode("hi", add_bos=True, add_eos=True) == [tok.bos_id, *tok.encode("hi"), tok.eos_id]
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|begin_of_text|>" and "chat_template" in cfg


def test_training_is_deterministic(tmp_path):
    texts = [f"the number {i} and the word w{i % 37} " * 3 for i in range(500)]
    train_tokenizer(texts, 600, tmp_path / "x")
    train_tokenizer(texts, 600, tmp_path / "y")
    assert (tmp_path / "x" / "tokenizer.json").read_bytes() == (tmp_path / "y" / "tokenizer.json").read_bytes()


def test_vocab_size_fits_default_model(tmp_path):
    texts = [f"word{i} " * 3 + f"other{i * 7}" for i in range(3000)]
    tok = train_tokenizer(texts, 8192, tmp_path / "t")
    assert tok.vocab_size <= 8192
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 100, None)


def test_batch_encoding_matches_single(tokenizer):
    texts = ["a first text", "", "second one, longer: 1234", "\n\nnewlines\n"]
    assert tokenizer.encode_batch(texts, add_bos=True) == [tokenizer.encode(t, add_bos=True) for t in texts]


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "2 + 2 = 4.\n\\boxed{4}"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_chat_format_is_llama3(tokenizer):
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 2 = 4.\n\\boxed{4}<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>")
    assert tokenizer.render_chat(MESSAGES) == expected
    prompt = tokenizer.render_chat(MESSAGES[:2], add_generation_prompt=True)
    assert prompt.endswith("What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_saved_chat_template_matches_hf(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save(tmp_path / "t")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert hf.apply_chat_template(MESSAGES, tokenize=False) == tokenizer.render_chat(MESSAGES)
    assert (hf.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
            == tokenizer.render_chat(MESSAGES[:2], add_generation_prompt=True))
    assert hf.bos_token_id == tokenizer.bos_id and hf.eos_token_id == tokenizer.eos_id
    assert hf.pad_token_id == tokenizer.pad_id
    # HF adds BOS when asked for special tokens, like the LLaMA-3 tokenizer.
    assert hf("some text").input_ids == tokenizer.encode("some text", add_bos=True)


def test_assistant_mask(tokenizer):
    ids, mask = tokenizer.encode_chat_with_mask(MESSAGES)
    assert ids == tokenizer.encode(tokenizer.render_chat(MESSAGES))
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "2 + 2 = 4.\n\\boxed{4}<|eot_id|>6<|eot_id|>"


def test_missing_tokenizer_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_split_digits_makes_every_digit_a_token(tmp_path):
    from ct_data import load_tokenizer, train_tokenizer

    texts = ["12345 + 678 = 13023", "the year 2024 had 365 days"] * 50
    grouped = train_tokenizer(texts, 400, tmp_path / "grouped")
    digits = train_tokenizer(texts, 400, tmp_path / "digits", split_digits=True)
    pieces = [digits.decode([i]) for i in digits.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]
    assert len(grouped.encode("12345")) < 5  # LLaMA-3 grouping merges up to 3 digits
    reloaded = load_tokenizer(tmp_path / "digits")  # the split survives save/load
    assert reloaded.encode("9081 apples") == digits.encode("9081 apples")
