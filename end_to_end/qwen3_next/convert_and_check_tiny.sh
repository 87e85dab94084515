#!/usr/bin/env bash
# Checkpoint workflow end to end on a tiny random Qwen3-Next (CPU, a few minutes): HF checkpoint -> golden logits ->
# orbax (scanned and unscanned) -> logit check -> back to HF. Run from the repository root, in the installed venv.
# With a real checkpoint, replace HF_DIR and keep the rest.
set -euo pipefail
WORK=${WORK:-/tmp/qwen3_next_e2e}
HF_DIR=$WORK/hf
rm -rf "$WORK" && mkdir -p "$WORK"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

python3 -m tests.assets.tiny_hf_checkpoint --output-dir="$HF_DIR"
python3 -m tests.assets.logits_generation.generate_hf_golden_logits --model-id="$HF_DIR" \
    --output-path="$WORK/golden.jsonl" --prompts='I love to;Today is a;What is the'
for scan in true false; do
  python3 -m maxtext.checkpoint_conversion.to_maxtext src/maxtext/configs/base.yml \
      base_output_directory="$WORK/ckpt_scan_$scan" hf_model_path="$HF_DIR" scan_layers=$scan use_multimodal=false
  python3 -m tests.utils.forward_pass_logit_checker src/maxtext/configs/base.yml tokenizer_type=huggingface \
      tokenizer_path=assets/tokenizers/qwen3-tokenizer load_parameters_path="$WORK/ckpt_scan_$scan/0/items" \
      scan_layers=false dtype=float32 --max_kl_div=2e-4 --golden_logits_path="$WORK/golden.jsonl"
done
python3 -m maxtext.checkpoint_conversion.to_huggingface src/maxtext/configs/base.yml \
    load_parameters_path="$WORK/ckpt_scan_true/0/items" base_output_directory="$WORK/hf_export"
python3 - "$HF_DIR" "$WORK/hf_export" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
original, exported = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in sys.argv[1:])
tokens = torch.randint(0, original.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
  same = torch.equal(original(tokens).logits, exported(tokens).logits)
print("exported checkpoint gives identical logits in transformers:", same)
sys.exit(0 if same else 1)
PY
