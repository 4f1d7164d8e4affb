"""Session fixtures of the training tests: a small synthetic dataset and a
persistent XLA compilation cache.

Most runs here share a config, so the cache lets later runs (and the
subprocesses, through the JAX_* environment variables of
`helpers.cache_env`) load the compiled train / eval / init programs instead
of compiling them again. Caching does not change any computed value.
"""

import dataclasses
import shutil

import jax
import pytest

from moejax.data import load_source
from tests.train import helpers


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data_dir holding the small synthetic_mixture dataset."""
  path = str(tmp_path_factory.mktemp('tfds'))
  for split in ('train', 'validation'):
    load_source('synthetic_mixture', split, path, **helpers.DATA)
  return path


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Points JAX's persistent compilation cache at a session directory."""
  path = str(tmp_path_factory.mktemp('jax_cache'))
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  helpers.CACHE_DIR[0] = path
  yield path
  for name, value in old.items():
    jax.config.update(name, value)
  helpers.CACHE_DIR[0] = None


@dataclasses.dataclass
class Reference:
  """An uninterrupted gshard run of helpers.STEPS steps (seed 0)."""
  workdir: str
  state: object  # the final TrainState
  records: list  # its metrics.jsonl

  def result(self):
    return self.state, self.records

  def copy_to(self, path) -> str:
    """A copy of the finished work dir (to resume or damage)."""
    shutil.copytree(self.workdir, str(path))
    return str(path)


@pytest.fixture(scope='session')
def reference(tmp_path_factory, data_dir):
  """Runs helpers.reference_argv once per session (in process)."""
  # pylint: disable=g-import-not-at-top
  from experiments import train
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  assert train.main(argv) == 0
  return Reference(workdir, *helpers.final_state(argv))
