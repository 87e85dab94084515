"""The edge of every command: parse, run, and turn expected failures into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from maxtext.configs import ConfigError


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
  """Call `main(argv)`; a ConfigError becomes `error: ...` on stderr and exit status 2."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  # jax logs a warning for every accelerator plugin it probes and does not find.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
  argv = sys.argv[1:] if argv is None else argv
  try:
    code = main(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
