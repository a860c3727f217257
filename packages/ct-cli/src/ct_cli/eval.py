"""ct-eval MODEL_DIR: held-out perplexity and reasoning accuracy of an HF model directory.

    ct-eval runs/recipe/posttrain_reasoning/hf                 # sample held-out problems
    ct-eval MODEL --problems ../shared/data/gsm8k/test.jsonl --max-problems 100
    ct-eval MODEL --problems data.jsonl --question-field prompt --answer-field solution

Accuracy: greedy generation in the chat format with the math system prompt; the last \\boxed{}
must match the reference answer exactly (GSM8K answers "... #### 42" are reduced to 42).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .common import UserFacingError, run_guarded, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ct-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="HF model directory (with its tokenizer)")
    p.add_argument("--problems", type=Path, help="jsonl of question/answer pairs (default: the sample eval split)")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--sample-dir", type=Path, help="where the sample data lives or is built (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="sample data seed (default: %(default)s)")
    p.add_argument("--sample-scale", type=float, default=1.0, help="sample data scale (default: %(default)s)")
    p.add_argument("--max-problems", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=0,
                   help="also sample N answers per problem: pass@1 (mean over samples), maj@N, pass@N")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: %(default)s)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the sampled answers")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks, run in "
                   "process on MODEL (results in MODEL/lm_eval_results.json); local task YAMLs work offline")
    p.add_argument("--lm-eval-include", type=Path, metavar="DIR", help="a directory of task YAMLs")
    p.add_argument("--limit", type=int, help="harness: at most this many documents per task")
    p.add_argument("--lm-eval-seeds", metavar="R,N,T,F", help="harness seeds: random, numpy, torch, few-shot "
                   "(default: lm-eval's own, 0,1234,1234,1234, so prompts match a standard lm-eval run)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()

    def run() -> int:
        from ct_stages import evaluate as ev

        import ct_model

        if (err := ct_model.hf.run_directory_error(args.model)) is not None:
            raise UserFacingError(str(err))
        if args.max_problems < 1:
            raise UserFacingError(f"--max-problems {args.max_problems}: must be at least 1")
        if args.limit is not None and args.limit < 1:
            raise UserFacingError(f"--limit {args.limit}: must be at least 1 (leave it out for every document)")
        if not (args.model / "config.json").is_file():
            raise UserFacingError(f"{args.model}: not an HF model directory (config.json missing)")
        if args.problems is not None and not args.problems.is_file():
            raise UserFacingError(f"--problems {args.problems}: no such file")
        if args.lm_eval:
            return run_lm_eval(args)
        model, tokenizer = ev.load_model_and_tokenizer(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            if args.problems is not None:
                try:
                    problems = ev.load_problems(args.problems, args.question_field, args.answer_field,
                                                args.max_problems)
                except ev.ProblemsFormatError as err:
                    raise UserFacingError(f"--problems: {err}; --question-field and --answer-field name "
                                          "the fields to read instead") from err
                if not problems:
                    raise UserFacingError(f"--problems {args.problems}: no problems in the file")
                texts = [f"{q['question']}\n{q['answer']}" for q in problems]
                source = str(args.problems)
            else:
                sample_dir = args.sample_dir or Path(tmp) / "sample"
                problems = ev.sample_eval_problems(sample_dir, args.seed, args.max_problems, args.sample_scale)
                texts = [f"{q['question']}\n{q['solution']}" for q in problems]
                source = f"sample eval split (seed {args.seed})"
        result = {"model": str(args.model), "problems_source": source,
                  **ev.text_perplexity(model, tokenizer, texts),
                  **ev.reasoning_accuracy(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch_size)}
        if args.samples:
            try:
                result.update(ev.sampled_accuracy(model, tokenizer, problems, samples=args.samples,
                                                  temperature=args.temperature, top_p=args.top_p,
                                                  seed=args.sample_seed, max_new_tokens=args.max_new_tokens,
                                                  batch_size=args.batch_size))
            except ValueError as err:
                raise UserFacingError(f"--samples/--temperature: {err}") from err
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['model']} on {source}")
            print(f"  held-out perplexity {result['perplexity']:.3f} (loss {result['eval_loss']:.4f}, "
                  f"{result['eval_tokens']} tokens)")
            print(f"  reasoning accuracy  {result['accuracy']:.1%} ({result['correct']}/{result['problems']}, greedy)")
            if args.samples:
                n = args.samples
                print(f"  sampled (T={args.temperature}, top-p {args.top_p}, {n} per problem): pass@1 "
                      f"{result['pass@1']:.1%}  maj@{n} {result[f'maj@{n}']:.1%}  pass@{n} {result[f'pass@{n}']:.1%}")
            for s in result["samples"][:2]:
                print(f"  e.g. Q: {s['question'][:80]!r}\n       A: {s['output'][:160]!r} "
                      f"({'correct' if s['correct'] else 'wrong'}, reference {s['answer']})")
        return 0

    return run_guarded(run)


def run_lm_eval(args) -> int:
    try:
        from ct_stages.harness import run_harness
    except ImportError as err:
        raise UserFacingError(f"--lm-eval: {err}") from err
    if args.lm_eval_include is not None and not args.lm_eval_include.is_dir():
        raise UserFacingError(f"--lm-eval-include {args.lm_eval_include}: no such directory")
    tasks = [t for t in args.lm_eval.split(",") if t]
    seeds = None
    if args.lm_eval_seeds is not None:
        names = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
        try:
            values = [int(v) for v in args.lm_eval_seeds.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise UserFacingError(f"--lm-eval-seeds {args.lm_eval_seeds}: four integers are needed "
                                  "(random,numpy,torch,few-shot; lm-eval's defaults are 0,1234,1234,1234)")
        seeds = dict(zip(names, values))
    out = args.model / "lm_eval_results.json"
    try:
        results = run_harness(args.model, tasks, include=args.lm_eval_include, limit=args.limit,
                              batch_size=args.batch_size, out_path=out, seeds=seeds)
    except KeyError as err:  # the harness's word for an unknown task
        raise UserFacingError(f"--lm-eval {args.lm_eval}: unknown task {err}") from err
    table = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
             for task, metrics in results["results"].items()}
    if args.json:
        print(json.dumps({"model": str(args.model), "lm_eval": table, "results_file": str(out)}))
        return 0
    print(f"{args.model}: lm-evaluation-harness ({out})")
    for task, metrics in table.items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"  {task:<24} n={results['n-samples'][task]['effective']:<6} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
