"""Reward functions: the built-in `math` verifier and user functions named `module:function`.

A reward function is called as fn(response_text, label) -> float for every sampled response.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from maxtext.configs import ConfigError

RewardFn = Callable[[str, str], float]

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")


def last_boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} (braces inside it balanced), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, begin = 0, start + len("\\boxed{")
  for index in range(begin, len(text)):
    if text[index] == "{":
      depth += 1
    elif text[index] == "}":
      if depth == 0:
        return text[begin:index]
      depth -= 1
  return None  # unclosed: the response was cut off before the answer ended


def extract_answer(text: str) -> str | None:
  """The final answer of a response: the last \\boxed{} content, else the last number, else None."""
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
  """Canonical text of an answer: no spaces, $ or \\text{}/\\mathrm{} wrappers; numbers without thousands commas,
  a leading + or trailing zeros ('1,000.50' -> '1000.5', '+3.0' -> '3')."""
  text = answer.strip()
  text = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", text)
  text = text.replace("$", "").replace("\\!", "").replace(" ", "").rstrip(".")
  candidate = text.replace(",", "")
  if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", candidate):
    value = float(candidate)
    return str(int(value)) if value == int(value) else repr(value)
  return text.lower()


def math_reward(response: str, label: str) -> float:
  """1.0 when the response's final answer equals the label after normalisation, else 0.0."""
  answer = extract_answer(response)
  if answer is None:
    return 0.0
  return float(normalize_answer(answer) == normalize_answer(str(label)))


BUILT_IN: dict[str, RewardFn] = {"math": math_reward}


def load_reward(name: str) -> RewardFn:
  """`math`, or `module:function` imported from the Python path; a ConfigError naming rl_reward otherwise."""
  if name in BUILT_IN:
    return BUILT_IN[name]
  if ":" not in name:
    raise ConfigError(
        f"config key 'rl_reward': unknown reward function '{name}' (built-in: {', '.join(BUILT_IN)}; or a"
        " user function as module:function)"
    )
  module_name, function_name = (part.strip() for part in name.split(":", 1))
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"config key 'rl_reward': cannot import module '{module_name}': {e}") from None
  function = getattr(module, function_name, None)
  if not callable(function):
    raise ConfigError(f"config key 'rl_reward': module '{module_name}' has no function '{function_name}'")
  return function


def score(reward_fn: RewardFn, responses: list[str], labels: list[str]) -> list[float]:
  """Rewards of the responses; a reward that is not a finite number stops the run naming the function."""
  rewards = []
  for response, label in zip(responses, labels):
    value = reward_fn(response, label)
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise ConfigError(f"config key 'rl_reward': the reward function returned {value!r}, not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
      raise ConfigError(f"config key 'rl_reward': the reward function returned {value}")
    rewards.append(value)
  return rewards
