"""lm-evaluation-harness on a tiny exported model, offline, through ct-eval --lm-eval: the harness's
sample count and exact-match agree with our own scoring of the same generations."""

from __future__ import annotations

import json
import sys
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


GSM8K_TRAIN = GSM8K.with_name("train.jsonl")
# The 8 first test documents' 5-shot prompts (lm-eval's few-shot seed 1234, the sample tokenizer)
# are 965..1455 tokens; a 1,300-token prompt window (max_length - 32 generated tokens) truncates
# 5 of them and leaves 3 whole.
WINDOW = 1300
GEN = 32


def lm_eval_gsm8k_task(tmp_path: Path) -> Path:
    """lm-eval's own gsm8k task (its YAML, included as is) pointed at the local data."""
    import lm_eval

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gsm8k_local.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks' / 'gsm8k' / 'gsm8k.yaml'}\n"
        "task: gsm8k_local\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
        f"    train: {GSM8K_TRAIN}\n    test: {GSM8K}\n"
        # gsm8k's own generation_kwargs, but 32 new tokens instead of HFLM's default 256: greedy
        # decoding of a random model over hundreds of tokens meets float-level near-ties between
        # transformers' and our kernels; 32 tokens keep both the comparison and CPU time short.
        "generation_kwargs:\n  until: [\"Question:\", \"</s>\", \"<|im_end|>\"]\n  do_sample: false\n"
        f"  temperature: 0.0\n  max_gen_toks: {GEN}\n")
    return tasks


def hflm_class(monkeypatch):
    """lm_eval.models.huggingface.HFLM. Its module imports accelerate at the top, which this
    workspace does not install (HFLM uses it only to spread a model over devices or processes):
    where it is absent, a stand-in that only satisfies the import (the single-process path taken
    with a model object never calls it)."""
    import importlib.util
    import types

    if importlib.util.find_spec("accelerate") is None:
        def unused(*args, **kwargs):
            raise AssertionError("accelerate stand-in called")

        stub, utils = types.ModuleType("accelerate"), types.ModuleType("accelerate.utils")
        stub.Accelerator = stub.InitProcessGroupKwargs = stub.find_executable_batch_size = unused
        utils.get_max_memory = unused
        stub.utils = utils
        monkeypatch.setitem(sys.modules, "accelerate", stub)
        monkeypatch.setitem(sys.modules, "accelerate.utils", utils)
        monkeypatch.delitem(sys.modules, "lm_eval.models.huggingface", raising=False)
    from lm_eval.models.huggingface import HFLM

    return HFLM


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data/gsm8k is absent")
def test_generations_equal_lm_evals_hflm_on_its_gsm8k_task_prompts_past_the_context_included(
        tmp_path, sample_dir, caplog, monkeypatch):
    """lm-eval's gsm8k task, 5-shot, 8 documents, on one export: CTModelLM's generations equal those
    of lm-eval's own HF wrapper (HFLM on transformers), prompts longer than the context included
    (both keep their last max_length - max_gen_toks tokens), with the same default seeds."""
    import transformers
    from lm_eval import simple_evaluate

    HFLM = hflm_class(monkeypatch)
    from lm_eval.tasks import TaskManager

    from ct_data import sample
    from ct_stages.harness import LM_EVAL_SEEDS, run_harness

    hf_dir = tmp_path / "hf"
    tokenizer = sample.build_tokenizer(sample_dir, 8192, split_digits=True)  # cached by conftest
    config = ct_model.presets.get("mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=2,
                                  num_query_groups=1, ffn_hidden_size=128, vocab_size=tokenizer.vocab_size,
                                  max_position_embeddings=WINDOW + GEN, init_method_std=0.3)
    # (std 0.3: the greedy answers differ from document to document; at 0.02 all are ":::::")
    ids = ct_model.hf.token_ids(tokenizer.bos_id, tokenizer.stop_ids, tokenizer.pad_id)
    ct_model.hf.save_hf(ct_model.build_model(config, seed=0), hf_dir, token_ids=ids)
    tokenizer.save(str(hf_dir))
    tasks = lm_eval_gsm8k_task(tmp_path)

    with caplog.at_level("WARNING", logger="ct_stages.harness"):
        ours = run_harness(hf_dir, ["gsm8k_local"], include=tasks, limit=8, out_path=tmp_path / "ours.json")
    assert ours["seeds"] == LM_EVAL_SEEDS == {"random_seed": 0, "numpy_random_seed": 1234,
                                              "torch_random_seed": 1234, "fewshot_random_seed": 1234}
    assert ours["config"]["fewshot_seed"] == 1234
    assert json.loads((tmp_path / "ours.json").read_text())["seeds"] == LM_EVAL_SEEDS
    assert ours["truncated_requests"] == {"generate_until": 5}
    warnings = [r.getMessage() for r in caplog.records if "left-truncated" in r.getMessage()]
    assert len(warnings) == 1 and "5 of 8 requests" in warnings[0]

    # HFLM as lm-eval builds it for `--model hf --model_args pretrained=DIR`, handed the model
    # transformers loads from the export (the path that needs no accelerate, which is not installed).
    hflm = HFLM(pretrained=transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                tokenizer=transformers.AutoTokenizer.from_pretrained(hf_dir), batch_size=8)
    theirs = simple_evaluate(model=hflm, tasks=["gsm8k_local"], limit=8, log_samples=True,
                             task_manager=TaskManager(include_path=str(tasks), include_defaults=False))

    def by_doc(results):
        return {s["doc_id"]: (s["arguments"], s["resps"]) for s in results["samples"]["gsm8k_local"]}

    mine, hflm = by_doc(ours), by_doc(theirs)
    assert len(mine) == 8 and mine.keys() == hflm.keys()
    for doc in mine:
        assert mine[doc][0] == hflm[doc][0], f"doc {doc}: another prompt"  # same few-shot examples
        assert mine[doc][1] == hflm[doc][1], f"doc {doc}: another generation"
    assert len({r[0][0] for _, r in mine.values()}) > 1  # the generations differ between documents
