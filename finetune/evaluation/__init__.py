"""What eval/evaluate.py (and the study) import: the library side of the evaluation stage.

data.py        a task's examples (datasets, or an SFT run's held-out split) and how they are rendered
loss.py        mean negative log-likelihood and perplexity over response tokens, tokenised as SFT tokenises
generation.py  batched generation of answers to a task's prompts
metrics.py     exact match, character F1, chrF, BLEU (ja-mecab for Japanese), the paired bootstrap
harness.py     lm-evaluation-harness tasks (Hub benchmarks, or local task YAMLs in eval/tasks/)
report.py      results.json, results.md (two models side by side), generations.jsonl
"""
