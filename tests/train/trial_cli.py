"""The trainer CLI with test-only timing hooks, for the kill trials.

    python -m tests.train.trial_cli [--step_delay SECONDS]
        [--pause_save STEP MARKER] -- <experiments.train args>

Runs `experiments.train` unchanged except for timing, so every computed
value is the one the plain CLI computes:
  --step_delay   sleep this long before each train batch is handed out, so
                 a test polling metrics.jsonl can send a signal "at step k"
                 with a wide margin before the next checkpoint.
  --pause_save   the save of checkpoint STEP stops just before orbax commits
                 it: everything is written to
                 `checkpoints/STEP.orbax-checkpoint-tmp`, MARKER is created,
                 and the process sleeps instead of renaming the directory to
                 `checkpoints/STEP`. A test waits for MARKER and SIGKILLs the
                 process: a kill in the middle of a checkpoint write, at a
                 moment chosen exactly rather than by a timing race.
"""

import asyncio
import pathlib
import sys
import time

from orbax.checkpoint._src.path import atomicity


def _pause_save(step: str, marker: str) -> None:
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == step:
      pathlib.Path(marker).write_text(str(self.get()))
      await asyncio.sleep(600)  # killed here
    return await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


class _SlowLoader:
  """Hands out the wrapped loader's batches after a delay."""

  def __init__(self, loader, delay: float):
    self._loader, self._delay = loader, delay
    self.batch_size, self.seq_len = loader.batch_size, loader.seq_len

  def batch(self, step):
    time.sleep(self._delay)
    return self._loader.batch(step)


def main() -> int:
  args = sys.argv[1:]
  split = args.index('--')
  options, argv = args[:split], args[split + 1:]
  # pylint: disable=g-import-not-at-top
  from experiments import config_lib
  from experiments import train
  while options:
    if options[0] == '--step_delay':
      delay = float(options[1])
      build_data = config_lib.build_data
      config_lib.build_data = lambda config, rows=None: (
          lambda loader, evals: (_SlowLoader(loader, delay), evals))(
              *build_data(config, rows))
      options = options[2:]
    elif options[0] == '--pause_save':
      _pause_save(options[1], options[2])
      options = options[3:]
    else:
      raise SystemExit(f'unknown option {options[0]}')
  return train.run_cli(argv)


if __name__ == '__main__':
  sys.exit(main())
