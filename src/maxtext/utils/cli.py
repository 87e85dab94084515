"""The edge of every command: parse, run, and turn expected failures into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from maxtext.checkpoint_conversion.safetensors_io import CheckpointFormatError
from maxtext.configs import ConfigError
from maxtext.utils import platforms


def run(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
  """Call `main(argv)`; a bad config becomes `error: ...` on stderr and exit status 2, an unreadable or unwritable
  file (bad checkpoint, output that exists) the same line and status 1."""
  platforms.default_platforms()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  # jax logs a warning for every accelerator plugin it probes and does not find.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
  argv = sys.argv[1:] if argv is None else argv
  try:
    code = main(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (CheckpointFormatError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
