"""A corrupt data cache is found when it is opened and rebuilt (or named);
building and opening the data prints nothing from TFDS.

A tiny synthetic_mixture dataset is built once, then each test damages a
copy of it the way a disk, a killed copy or a user does (truncated, zeroed,
a zeroed first block, a flipped bit, a deleted shard, an empty
dataset_info.json) and loads it again.
"""

import glob
import logging
import os
import shutil

import numpy as np
import pytest

from experiments import config_lib
from moejax.data import DataCacheError
from moejax.data import builders
from moejax.data import cache
from moejax.data import tfds_quiet

KW = dict(num_train=40, num_eval=8, example_len=9, vocab_size=32)
NAME = 'synthetic_mixture'


def _dataset_dir(data_dir):
  (path,) = glob.glob(os.path.join(data_dir, NAME, '*', '1.0.0'))
  return path


def _shard(data_dir, split='train'):
  (path,) = glob.glob(os.path.join(_dataset_dir(data_dir),
                                   f'{NAME}-{split}.array_record-*'))
  return path


def _tokens(data_dir, split='train'):
  source = builders.load_source(NAME, split, data_dir, **KW)
  return np.stack([source[i]['tokens'] for i in range(len(source))])


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """(data dir of the intact dataset, its train tokens)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return data_dir, _tokens(data_dir)


@pytest.fixture
def copy(built, tmp_path):
  """A fresh copy of the intact data dir."""
  path = str(tmp_path / 'tfds')
  shutil.copytree(built[0], path)
  return path


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(1000)


def _zero(path):
  size = os.path.getsize(path)
  with open(path, 'wb') as f:
    f.write(bytes(size))


def _zero_head(path):  # footer and index intact: only reading finds it
  with open(path, 'r+b') as f:
    f.write(bytes(4096))


def _flip_bit(path):
  with open(path, 'r+b') as f:
    f.seek(200)
    byte = f.read(1)[0]
    f.seek(200)
    f.write(bytes([byte ^ 1]))


DAMAGE = {'truncated': _truncate, 'zeroed': _zero, 'zeroed head': _zero_head,
          'bit flip': _flip_bit, 'deleted': os.remove}


@pytest.mark.parametrize('checksums', [True, False],
                         ids=['checksums', 'built before checksums'])
@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_shard_is_rebuilt_with_a_warning(built, copy, damage,
                                                 checksums, capfd):
  if not checksums:
    os.remove(os.path.join(_dataset_dir(copy), cache.CHECKSUM_FILE))
  shard = _shard(copy)
  DAMAGE[damage](shard)
  problem = cache.find_problem(_dataset_dir(copy))
  assert problem and problem.startswith(f'{shard}: '), problem
  np.testing.assert_array_equal(_tokens(copy), built[1])  # rebuilt
  out, err = capfd.readouterr()
  assert err.startswith(f'warning: the {NAME} data cache is corrupt: '
                        f'{shard}: '), err
  assert f'rebuilding {_dataset_dir(copy)}' in err
  assert out.startswith(f'data: built {NAME} (40 train + 8 validation '
                        'examples)')
  assert cache.find_problem(_dataset_dir(copy)) is None
  _tokens(copy)  # intact now: no second rebuild
  assert capfd.readouterr() == ('', '')


def test_bad_metadata_is_rebuilt(built, copy, capfd):
  info = os.path.join(_dataset_dir(copy), 'dataset_info.json')
  with open(info, 'w', encoding='utf-8') as f:
    f.write('{"name": "synthetic_mix')  # cut short
  np.testing.assert_array_equal(_tokens(copy), built[1])
  assert f'corrupt: {info}: unreadable (JSONDecodeError' in (
      capfd.readouterr().err)


def test_shard_with_other_record_count_is_found(copy):
  directory = _dataset_dir(copy)
  shutil.copyfile(_shard(copy, 'validation'), _shard(copy, 'train'))
  problem = cache.find_problem(directory)
  assert problem == (f'{_shard(copy)}: holds 8 records, dataset_info.json '
                     'lists 40'), problem


def test_legacy_cache_gets_checksums(copy):
  directory = _dataset_dir(copy)
  sums_path = os.path.join(directory, cache.CHECKSUM_FILE)
  with open(sums_path, encoding='utf-8') as f:
    want = f.read()
  os.remove(sums_path)
  assert cache.find_problem(directory) is None  # read through, then adopted
  with open(sums_path, encoding='utf-8') as f:
    assert f.read() == want


def test_undeletable_cache_names_the_file_and_the_directory(copy,
                                                            monkeypatch):
  _zero(_shard(copy))

  def refuse(path, *args, **kwargs):
    raise PermissionError(13, 'Permission denied', path)

  monkeypatch.setattr(shutil, 'rmtree', refuse)
  config = config_lib.load_config('configs/dense.py:tiny')
  config.data.data_dir = copy
  config.data.update(seq_len=8, **KW)
  config.train.update(batch_size=4, eval_batches=2)
  with pytest.raises(DataCacheError) as info:
    config_lib.build_data(config)
  message = str(info.value)
  assert f'({_shard(copy)}: unreadable' in message, message
  assert message.endswith(f'delete the directory {_dataset_dir(copy)} and '
                          're-run: it is rebuilt from data.* (nothing else '
                          'is lost).'), message
  assert 'allowed values' not in message  # not "not a known dataset"


def test_build_and_load_print_nothing_from_tfds(tmp_path, capfd, caplog):
  caplog.set_level(logging.INFO)
  data_dir = str(tmp_path / 'tfds')
  for split in ('train', 'validation'):
    builders.load_source(NAME, split, data_dir, **KW)
  out, err = capfd.readouterr()
  assert out == (f'data: built {NAME} (40 train + 8 validation examples) in '
                 f'{_dataset_dir(data_dir)} ({out.split("(")[-1]}')
  assert err == ''
  for split in ('train', 'validation'):
    builders.load_source(NAME, split, data_dir, **KW)
  assert capfd.readouterr() == ('', '')
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  # Outside quiet_tfds TFDS does log its notice (so the check above can
  # fail), and the filter is gone after the block.
  builders.SyntheticMixtureBuilder(
      config=builders.synthetic_mixture_config(**KW), data_dir=data_dir)
  assert any('Using custom data configuration' in r.getMessage()
             for r in caplog.records)
  assert not logging.getLogger('absl').filters
  assert tfds_quiet.tqdm_utils._active  # progress bars restored
