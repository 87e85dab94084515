"""Training batches: synthetic tokens, or local files through grain (tokenise, shuffle, pack, batch).

Every pipeline yields this host's rows of the global batch as numpy arrays keyed by
`maxtext.trainers.train_step.BATCH_KEYS` and has `get_state()` / `set_state()` so a checkpoint can resume it.
"""

from __future__ import annotations

from maxtext.input_pipeline.iterators import BatchIterator, DataShare, ShardMismatchError, make_train_iterator

__all__ = ["BatchIterator", "DataShare", "ShardMismatchError", "make_train_iterator"]
