"""Read base.yml, merge models/<model_name>.yml and `key=value` overrides, coerce types, freeze.

Precedence, lowest first: base.yml < models/<model_name>.yml < command-line overrides < `overrides` argument.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

# model_record is a leaf of checkpoint_conversion (json + numpy); the HF config translation lives in configs/.
from maxtext.checkpoint_conversion import model_record
from maxtext.configs import hf_config
from maxtext.configs.types import MODEL_KEYS, Config, ConfigError, allowed_values

CONFIGS_DIR = os.path.dirname(os.path.abspath(__file__))
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def model_config_path(model_name: str) -> str:
  return os.path.join(CONFIGS_DIR, "models", f"{model_name}.yml")


def available_models() -> list[str]:
  return sorted(f[:-4] for f in os.listdir(os.path.join(CONFIGS_DIR, "models")) if f.endswith(".yml"))


def _read_yaml(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise ConfigError(f"config file '{path}' does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"config file '{path}' must hold a mapping of key: value")
  return data


def _unknown_key_error(key: str, source: str) -> ConfigError:
  known = list(Config.field_types())
  close = difflib.get_close_matches(key, known, n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ""
  return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
  """Convert a YAML or command-line value to the field's type, or raise naming the key."""
  choices = allowed_values(annotation)
  target = str if choices else annotation
  bad = ConfigError(f"config key '{key}' expects {_type_name(annotation)}, got {value!r} ({source})")
  if target is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
      return value.strip().lower() in _TRUE
    raise bad
  if target is int:
    if isinstance(value, bool):
      raise bad
    if isinstance(value, int):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, str):
      try:
        return int(value.strip())
      except ValueError:
        raise bad from None
    raise bad
  if target is float:
    if isinstance(value, bool):
      raise bad
    if isinstance(value, (int, float)):
      result = float(value)
    elif isinstance(value, str):
      try:
        result = float(value.strip())
      except ValueError:
        raise bad from None
    else:
      raise bad
    if not math.isfinite(result):
      raise bad
    return result
  if target is str:
    if not isinstance(value, str):
      raise bad
    if choices and value not in choices:
      raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got '{value}' ({source})")
    return value
  raise TypeError(f"unsupported field type for config key '{key}': {annotation}")


def _type_name(annotation: Any) -> str:
  choices = allowed_values(annotation)
  if choices:
    return "one of " + ", ".join(choices)
  return {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string"}[annotation]


def parse_cli(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
  """Split `[config.yml] key=value ...` into the YAML path and the overrides (values still strings)."""
  yaml_path = None
  overrides: dict[str, str] = {}
  for i, arg in enumerate(argv):
    if "=" in arg:
      key, value = arg.split("=", 1)
      key = key.strip()
      if not key:
        raise ConfigError(f"malformed override '{arg}': expected key=value")
      if key in overrides:
        raise ConfigError(f"config key '{key}' is given twice on the command line")
      overrides[key] = value
    elif i == 0 and arg.endswith((".yml", ".yaml")):
      yaml_path = arg
    else:
      raise ConfigError(f"unexpected argument '{arg}': expected a config .yml first, then key=value overrides")
  return yaml_path, overrides


def load_config(
    argv: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    base_yaml: str | None = None,
) -> Config:
  """Build the frozen Config from `[config.yml] key=value ...` (as on a command line) and extra overrides.

  `base_yaml` defaults to the YAML named in argv, else this package's base.yml.
  """
  cli_yaml, cli_overrides = parse_cli(argv)
  base_path = cli_yaml or base_yaml or os.path.join(CONFIGS_DIR, "base.yml")
  field_types = Config.field_types()

  base = _read_yaml(base_path)
  later: list[tuple[str, Mapping[str, Any]]] = [("the command line", cli_overrides), ("overrides", overrides or {})]
  last = lambda key: next((layer[key] for _, layer in reversed(later) if key in layer), base.get(key))
  named_model = next((layer["model_name"] for _, layer in reversed(later) if "model_name" in layer), None)
  checkpoint = _checkpoint_model(str(last("load_parameters_path") or ""), str(last("hf_model_path") or ""),
                                 model_named=named_model not in (None, "auto"))
  if named_model == "auto" and checkpoint is None:
    raise ConfigError("model_name=auto reads the model from a checkpoint: also give load_parameters_path or hf_model_path")
  if checkpoint is not None and named_model in (None, "auto"):
    # The checkpoint says what the model is; base.yml's default model_name does not apply.
    checkpoint_source, checkpoint_keys = checkpoint
    model_layer = (checkpoint_source, {**checkpoint_keys, "model_name": "auto"})
  else:
    model_name = named_model if named_model is not None else base.get("model_name")
    if not isinstance(model_name, str) or not model_name:
      raise ConfigError(f"config key 'model_name' must name a model ({', '.join(available_models())})")
    model_path = model_config_path(model_name)
    if not os.path.isfile(model_path):
      raise ConfigError(f"unknown model_name '{model_name}': choose one of auto, {', '.join(available_models())}")
    model_layer = (f"'{model_path}'", _read_yaml(model_path))
  sources = [(f"'{base_path}'", base), model_layer, *later]

  merged: dict[str, Any] = {}
  origin: dict[str, str] = {}
  for source, layer in sources:
    for key, value in layer.items():
      if key not in field_types:
        raise _unknown_key_error(key, source)
      merged[key] = value
      origin[key] = source
  missing = [k for k in field_types if k not in merged]
  if missing:
    raise ConfigError(f"config key '{missing[0]}' has no value: add it to {base_path}")
  values = {k: _coerce(k, merged[k], field_types[k], origin[k]) for k in field_types}
  if checkpoint is not None:
    _check_matches_checkpoint(values, checkpoint, field_types)
  return Config(**values)


def _checkpoint_model(
    load_parameters_path: str, hf_model_path: str, model_named: bool
) -> tuple[str, dict[str, Any]] | None:
  """(where from, model keys) of the checkpoint the run starts from, if it says what model it holds."""
  if load_parameters_path:
    model_record.items_dir(load_parameters_path)  # a missing path is named before anything else is read
    step_dir = model_record.step_dir_of(load_parameters_path)
    record = model_record.read_record(load_parameters_path)
    if record is None:
      if model_named:
        return None  # a checkpoint written elsewhere: the named model's shapes are checked at load
      raise ConfigError(
          f"the checkpoint '{step_dir}' has no model record ({model_record.MODEL_CONFIG_FILE}): an incomplete save or"
          " not a maxtext checkpoint; name its model with model_name=... to load it anyway")
    return f"the checkpoint '{step_dir}'", dict(record["model"])
  if hf_model_path:
    path = os.path.join(hf_model_path, "config.json")
    if not os.path.isfile(path):
      raise ConfigError(f"hf_model_path '{hf_model_path}' has no config.json")
    try:
      with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"'{path}' is not valid JSON (line {e.lineno})") from None
    try:
      return f"'{path}'", hf_config.config_overrides_from_hf(hf)
    except KeyError as e:
      raise ConfigError(f"'{path}' lacks the key {e}") from None
  return None


def _check_matches_checkpoint(values: Mapping[str, Any], checkpoint, field_types) -> None:
  """A named model or a model key on the command line must agree with the checkpoint; stop at the first field."""
  source, keys = checkpoint
  for key in MODEL_KEYS:
    if key not in keys:
      continue
    theirs = _coerce(key, keys[key], field_types[key], source)
    if values[key] != theirs:
      raise ConfigError(
          f"model_name={values['model_name']} does not match {source}: '{key}' is {values[key]!r} here but"
          f" {theirs!r} in the checkpoint (omit model_name, or use model_name=auto, to take the checkpoint's)"
      )
