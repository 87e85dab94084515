"""configs/ sits below the model code: importing it pulls in no layer, model, kernel or conversion module.

The loader reads a checkpoint's model record (checkpoint_conversion/model_record.py, a leaf: json and numpy) and
translates an HF config.json (configs/hf_config.py); anything more would close an import circle again.
"""

import subprocess
import sys

ALLOWED_OUTSIDE_CONFIGS = {
    "maxtext",
    "maxtext.checkpoint_conversion",
    "maxtext.checkpoint_conversion.model_record",
    "maxtext.checkpoint_conversion.safetensors_io",
}


def test_configs_import_no_upper_layer():
  code = "import sys, maxtext.configs; print(' '.join(m for m in sys.modules if m.startswith('maxtext')))"
  loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
  assert "maxtext.configs.loader" in loaded and "maxtext.configs.hf_config" in loaded, loaded
  outside = {m for m in loaded if not m.startswith("maxtext.configs")} - ALLOWED_OUTSIDE_CONFIGS
  assert not outside, f"importing maxtext.configs loads {sorted(outside)}"
