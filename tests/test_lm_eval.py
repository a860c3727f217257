"""lm-evaluation-harness on a tiny exported model, offline, through ct-eval --lm-eval: the harness's
sample count and exact-match agree with our own scoring of the same generations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

import ct_data  # noqa: E402
import ct_model  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{target}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("tiny_hf")
    config = ct_model.presets.get("mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=2,
                                  num_query_groups=1, ffn_hidden_size=128)
    ct_model.hf.save_hf(ct_model.build_model(config, seed=0), out)
    from ct_data import sample

    tokenizer = sample.build_tokenizer(sample_dir, 8192, split_digits=True)  # cached by conftest
    tokenizer.save(str(out))
    return out


def greedy(hf_dir: Path, questions: list[str], max_new: int = 12) -> list[str]:
    """Our own greedy answers to the task's prompts, cut where the task says."""
    model, _ = ct_model.hf.load_hf(hf_dir)
    tokenizer = ct_data.load_tokenizer(str(hf_dir))
    prompts = [[tokenizer.bos_id] + tokenizer.encode(f"Question: {q}\nAnswer:") for q in questions]
    with torch.no_grad():
        outs = ct_model.generate(model.eval(), prompts, max_new, eos_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return [t.split("\n\n")[0].split("Question:")[0] for t in texts]


def test_a_generated_local_task_scores_what_our_generations_say(tmp_path, tiny_hf):
    from ct_cli import eval as eval_cli

    questions = [f"What is {i} plus {i}?" for i in range(6)]
    ours = greedy(tiny_hf, questions)
    # Half the targets are our own greedy answers, half cannot be: the harness must find 3/6.
    rows = [{"question": q, "target": a if i % 2 == 0 else "never generated"} for i, (q, a) in
            enumerate(zip(questions, ours))]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "echo.yaml").write_text(TASK.format(name="ct_echo", path=tmp_path / "data.jsonl",
                                                 target="{{target}}"))
    assert eval_cli.main([str(tiny_hf), "--lm-eval", "ct_echo", "--lm-eval-include", str(tasks), "--json"]) == 0
    results = json.loads((tiny_hf / "lm_eval_results.json").read_text())
    assert results["n-samples"]["ct_echo"]["effective"] == 6
    assert results["results"]["ct_echo"]["exact_match,none"] == pytest.approx(0.5)
    responses = [s["filtered_resps"][0] for s in results["samples"]["ct_echo"]]
    assert sorted(responses) == sorted(ours)


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data/gsm8k is absent")
def test_gsm8k_format_task_on_the_shared_data(tmp_path, tiny_hf):
    from ct_stages.harness import run_harness

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gsm8k_local.yaml").write_text(TASK.format(
        name="gsm8k_local", path=GSM8K, target="{{answer.split('####')[-1].strip()}}"))
    results = run_harness(tiny_hf, ["gsm8k_local"], include=tasks, limit=4)
    assert results["n-samples"]["gsm8k_local"]["effective"] == 4
    samples = results["samples"]["gsm8k_local"]
    own = sum(s["filtered_resps"][0] == s["target"] for s in samples) / len(samples)
    assert results["results"]["gsm8k_local"]["exact_match,none"] == pytest.approx(own)
