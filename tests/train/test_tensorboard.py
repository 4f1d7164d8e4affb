"""TensorBoard events after a resume: every step is shown once.

A resumed run restarts from its last checkpoint at step s, but an interrupted
run may have written events for steps after s. MetricsWriter marks them stale
(purge at s + 1: a SessionLog START event at that step); TensorBoard then
drops the earlier events whose step is >= that step. The test reads the
event files itself and applies that rule (helpers.tensorboard_scalars).
The same after a real SIGKILL of the CLI: test_workdir_safety.
"""

import glob
import os

from moejax.train import metrics as metrics_lib
from tests.train import helpers


def test_tensorboardx_imports():
  """tensorboardX is a dependency (setup.py install_requires), and without
  it MetricsWriter only warns: a missing or broken install fails here (and
  the tests below), it is not skipped. These are the modules MetricsWriter
  imports. (Imported in a test, not at module level: a collection error
  would stop the whole suite.)"""
  # pylint: disable=g-import-not-at-top,unused-import
  from tensorboardX import event_file_writer
  from tensorboardX import summary
  from tensorboardX.proto import event_pb2


def _visible_scalars(logdir, tag):
  """{step: [values]} of `tag` as TensorBoard shows it (see
  helpers.tensorboard_scalars)."""
  files = glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))
  assert len(files) == 2  # one per writer: none overwrote the other
  return helpers.tensorboard_scalars(logdir)[tag]


def _interrupted_then_resumed(workdir, start_step):
  """Steps 1-6 logged (loss = step), then a writer resumed at `start_step`
  logs steps 4-7 (loss = 10 + step); returns what TensorBoard shows."""
  first = metrics_lib.MetricsWriter(workdir)
  for step in range(1, 7):
    first.write({'step': step, 'train/loss': float(step)})
  first.close()
  second = metrics_lib.MetricsWriter(workdir, start_step=start_step)
  for step in range(4, 8):
    second.write({'step': step, 'train/loss': 10.0 + step})
  second.close()
  return _visible_scalars(os.path.join(workdir, 'tensorboard'), 'train/loss')


def test_resume_hides_the_stale_tail(tmp_path):
  # Interrupted after step 6, last checkpoint at step 3.
  shown = _interrupted_then_resumed(str(tmp_path), start_step=3)
  # Steps 1-3 from the first run, 4-7 from the resumed one, each once.
  assert shown == {1: [1.0], 2: [2.0], 3: [3.0], 4: [14.0], 5: [15.0],
                   6: [16.0], 7: [17.0]}


def test_without_the_purge_steps_would_repeat(tmp_path):
  # The check above can fail: the same writes with a purge at step 7
  # (start_step=6, i.e. not the checkpoint's step) leave 4-6 twice.
  shown = _interrupted_then_resumed(str(tmp_path), start_step=6)
  assert shown[4] == [4.0, 14.0] and shown[7] == [17.0]
