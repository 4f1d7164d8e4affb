"""Fixtures of the training tests: a small synthetic dataset, a persistent
XLA compilation cache, and the uninterrupted reference run.

Most runs here share a config, so the cache lets later runs (and the
subprocesses, through the JAX_* environment variables of
`helpers.cache_env`) load the compiled train / eval / init programs instead
of compiling them again. Caching does not change any computed value.

The cache is on for the tests of this package only: a package-scoped
fixture turns it on and off again (an xdist worker also runs other
packages' tests, which must compile as they would alone), while its
directory lives for the session, so every stretch of this package's tests
on a worker shares it.
"""

import dataclasses
import shutil

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


@pytest.fixture(scope='session')
def jax_cache_dir(tmp_path_factory):
  """The directory of this package's persistent compilation cache."""
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='package', autouse=True)
def compilation_cache(jax_cache_dir):
  """The persistent compilation cache, on while this package's tests run.

  pytest tears a package fixture down before a test of another package, so
  tests elsewhere never see this cache (see helpers.persistent_compilation_
  cache for why the cache is also reset).
  """
  with helpers.persistent_compilation_cache(jax_cache_dir):
    helpers.CACHE_DIR[0] = jax_cache_dir
    try:
      yield jax_cache_dir
    finally:
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
def reference(tmp_path_factory, data_dir, jax_cache_dir):
  """Runs helpers.reference_argv once per session (in process).

  With the cache on explicitly: pytest sets session fixtures up before the
  package-scoped `compilation_cache`, and this run's programs are the ones
  most later runs load.
  """
  # pylint: disable=g-import-not-at-top
  from experiments import train
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  argv = helpers.reference_argv(workdir, data_dir)
  with helpers.persistent_compilation_cache(jax_cache_dir):
    assert train.main(argv) == 0
    return Reference(workdir, *helpers.final_state(argv))
