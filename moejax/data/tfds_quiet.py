"""Quiet TFDS: its routine notices around moejax's own builder calls.

Building or opening the locally generated datasets printed, on every run,
`WARNING:absl:Using custom data configuration: ...` (once per builder, two
per run), "Downloading and preparing dataset Unknown size ..." and progress
bars, none of which says anything is wrong. `quiet_tfds` silences them
around the builder calls only (not globally: other absl warnings, and TFDS
elsewhere in the process, are untouched); `QuietBuild` drops the two print
lines of a build, for which `builders.prepare_builder` prints one line.
"""

from __future__ import annotations

import contextlib
import logging

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

# TFDS notices that say nothing about moejax's locally built data: the
# absl warning for every parameterised config, logged each time a builder is
# made (twice a run).
_TFDS_NOTICES = ('Using custom data configuration',)


class _DropNotices(logging.Filter):
  """Drops the absl log records that start with one of `_TFDS_NOTICES`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TFDS_NOTICES)


@contextlib.contextmanager
def quiet_tfds():
  """Silences TFDS's routine notices and progress bars inside the block.

  Only the records of `_TFDS_NOTICES` are dropped (other absl warnings
  still show), and the progress-bar switch is restored afterwards; the
  "Downloading and preparing dataset" lines are `QuietBuild`'s.
  """
  absl_logger, notices = logging.getLogger('absl'), _DropNotices()
  bars = getattr(tqdm_utils, '_active', True)
  absl_logger.addFilter(notices)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(bars)
    absl_logger.removeFilter(notices)


class QuietBuild:
  """Mixin of the builders: no TFDS "Downloading and preparing dataset
  Unknown size ..." / "... downloaded and prepared" lines (nothing is
  downloaded); `prepare_builder` prints one line per build instead."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass
