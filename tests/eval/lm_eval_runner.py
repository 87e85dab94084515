"""Run lm-eval's `local-completions` on local MMLU-format tasks and print each question's per-choice scores as JSON.

  python3 -m tests.eval.lm_eval_runner BASE_URL MODEL INCLUDE_DIR TASKS BACKENDS TOKENIZER_DIR

BACKENDS: comma-separated lm-eval tokenizer backends (remote, huggingface), each run in turn in this process.

A subprocess of the lm-eval acceptance test: lm-eval and `datasets` read their offline switches at import."""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
  base_url, model, include, tasks, backends, tokenizer = argv[:6]
  os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  import lm_eval  # noqa: PLC0415 - after the offline switches
  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  manager = TaskManager(include_path=include)
  out: dict = {}
  for backend in backends.split(","):
    args = f"model={model},base_url={base_url}/v1/completions,tokenizer_backend={backend},max_length=256"
    args += ",max_retries=1" + (f",tokenizer={tokenizer}" if backend == "huggingface" else "")
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks.split(","),
                                      num_fewshot=0, batch_size=8, log_samples=True, task_manager=manager)
    out[backend] = {
        task: [{"question": s["doc"]["question"], "scores": [float(r[0][0]) for r in s["resps"]],
                "acc": float(s["acc"])} for s in sorted(samples, key=lambda s: s["doc_id"])]
        for task, samples in results["samples"].items()}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])
