"""Tests of the TFDS builders (TensorFlow absent) and the grain loader."""

import itertools
import math
import sys

import numpy as np
import pytest

from moejax.data import builders
from moejax.data import pipeline
from moejax.data.synthetic import SyntheticMixture

KW = dict(num_train=300, num_eval=64, example_len=33)
LEN = KW['example_len']


def _records(source):
  return [source[i] for i in range(len(source))]


def _assert_same_records(a, b):
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    assert sorted(ra) == sorted(rb)
    for k in ra:
      np.testing.assert_array_equal(ra[k], rb[k])


def _assert_same_batch(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def train(data_dir):
  return builders.load_source('synthetic_mixture', 'train', data_dir, **KW)


@pytest.fixture(scope='module')
def valid(data_dir):
  return builders.load_source('synthetic_mixture', 'validation', data_dir,
                              **KW)


# ------------------------------------------------------------------ builders
def test_build_without_tensorflow(train, valid):
  assert 'tensorflow' not in sys.modules
  assert len(train) == 300 and len(valid) == 64
  rec = train[0]
  assert set(rec) == {'tokens', 'domain', 'optimal_nll'}
  assert rec['tokens'].shape == (LEN,) and rec['tokens'].dtype == np.int32
  assert np.asarray(rec['domain']).shape == ()
  assert np.asarray(rec['optimal_nll']).shape == ()


def test_records_match_generator(train, valid):
  lang = SyntheticMixture()  # Default language settings of KW.
  recs = _records(train)
  tokens = np.stack([r['tokens'] for r in recs])
  domain = np.array([r['domain'] for r in recs])
  nll = np.array([r['optimal_nll'] for r in recs])
  # Train split = chunk 0 of the (seed, split=1) stream, in order.
  want_tokens, want_domain = lang.sample(np.random.default_rng((0, 1, 0)),
                                         300, LEN)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(domain, want_domain)
  np.testing.assert_allclose(nll, lang.optimal_nll(tokens).mean(1), rtol=1e-6)
  # Validation is drawn from a different seed: no shared sequence.
  train_rows = {r.tobytes() for r in tokens}
  assert not any(r['tokens'].tobytes() in train_rows for r in _records(valid))


def test_rebuild_and_reread_identical(train, tmp_path):
  again = builders.load_source('synthetic_mixture', 'train', str(tmp_path),
                               **KW)
  _assert_same_records(_records(train), _records(again))
  _assert_same_records(_records(train), _records(train))


def test_config_names():
  default = builders.synthetic_mixture_config()
  assert default.name == 'd8_v256_s8_a0.5_seed0_len129_n20000_e1000'
  assert builders.synthetic_mixture_config(**KW).name == (
      builders.synthetic_mixture_config(**KW).name)
  names = {builders.synthetic_mixture_config(**kw).name for kw in [
      {}, dict(seed=1), dict(alpha=0.25), dict(support=4), dict(num_eval=5),
      dict(example_len=65), dict(num_domains=4), dict(vocab_size=128),
      dict(num_train=10)]}
  assert len(names) == 9
  with pytest.raises(ValueError, match='bogus'):
    builders.synthetic_mixture_config(bogus=1)


def test_local_text_round_trip(tmp_path):
  docs = [b'hello world\n' * 20, 'caf\u00e9 \u00fcber na\u00efve '.encode() * 9]
  for i, doc in enumerate(docs):
    (tmp_path / f'doc{i}.txt').write_bytes(doc)
  pattern, data_dir = str(tmp_path / '*.txt'), str(tmp_path / 'tfds')
  kw = dict(pattern=pattern, example_len=16)
  tr = builders.load_source('local_text', 'train', data_dir, **kw)
  va = builders.load_source('local_text', 'validation', data_dir, **kw)
  assert 'tensorflow' not in sys.modules
  stream = docs[0] + b'\0' + docs[1] + b'\0'
  num = len(stream) // 16
  assert len(va) == math.ceil(0.05 * num) and len(tr) + len(va) == num
  got = np.concatenate([r['tokens'] for r in _records(tr) + _records(va)])
  assert got.dtype == np.int32
  assert bytes(got.astype(np.uint8)) == stream[:num * 16]
  assert all(r['domain'] == -1 for r in _records(va))
  # Changing the content gives a different dataset name.
  name = builders.local_text_config(**kw).name
  (tmp_path / 'doc0.txt').write_bytes(b'other text ' * 30)
  assert builders.local_text_config(**kw).name != name


def test_local_text_no_files(tmp_path):
  with pytest.raises(ValueError, match='pattern'):
    builders.local_text_config(str(tmp_path / 'none*.txt'))


def test_byte_text_source():
  raw = [{'text': 'ab\u00e9'}, {'text': b'0123456789'}, {'body': 'x'}]
  src = builders.ByteTextSource(raw, example_len=5)
  np.testing.assert_array_equal(src[0]['tokens'], [97, 98, 195, 169, 0])
  np.testing.assert_array_equal(src[1]['tokens'], [48, 49, 50, 51, 52])
  with pytest.raises(KeyError, match='text_key'):
    src[2]  # pylint: disable=pointless-statement


# -------------------------------------------------------------------- loader
def test_batch_is_pure_function_of_seed_and_step(train, data_dir):
  other = builders.load_source('synthetic_mixture', 'train', data_dir, **KW)
  a = pipeline.BatchLoader(train, batch_size=8, seed=11)
  b = pipeline.BatchLoader(other, batch_size=8, seed=11)
  for step in (0, 1, 37, 500):
    _assert_same_batch(a.batch(step), b.batch(step))
  batch = a.batch(3)
  assert batch['tokens'].shape == (8, LEN) and batch['tokens'].dtype == np.int32
  assert batch['domain'].shape == (8,) and batch['domain'].dtype == np.int32
  assert batch['optimal_nll'].shape == (8,)
  assert batch['optimal_nll'].dtype == np.float32
  assert not np.array_equal(a.batch(0)['tokens'], a.batch(1)['tokens'])
  c = pipeline.BatchLoader(train, batch_size=8, seed=12)
  assert not np.array_equal(a.batch(0)['tokens'], c.batch(0)['tokens'])


def test_resume_sees_same_batches(train):
  loader = pipeline.BatchLoader(train, batch_size=6, seed=1)
  full = list(itertools.islice(loader.iterate(0, prefetch=0), 10))
  resumed = pipeline.BatchLoader(train, batch_size=6, seed=1)
  tail = list(itertools.islice(resumed.iterate(4, prefetch=2), 6))
  for x, y in zip(full[4:], tail):
    _assert_same_batch(x, y)


def test_epoch_is_a_permutation_and_reshuffled(train):
  loader = pipeline.BatchLoader(train, batch_size=20, seed=5)
  ids = {r['tokens'].tobytes(): i for i, r in enumerate(_records(train))}

  def epoch(e):
    rows = np.concatenate([loader.batch(s)['tokens'] for s in
                           range(15 * e, 15 * (e + 1))])
    return [ids[r.tobytes()] for r in rows]

  first, second = epoch(0), epoch(1)
  assert sorted(first) == sorted(second) == list(range(300))
  assert first != list(range(300)) and first != second


@pytest.mark.parametrize('count', [2, 4])
def test_process_shares_concatenate_to_global_batch(train, count):
  full = pipeline.BatchLoader(train, batch_size=8, seed=2, seq_len=16)
  parts = [pipeline.BatchLoader(train, batch_size=8, seed=2, seq_len=16,
                                process_index=p, process_count=count)
           for p in range(count)]
  for step in (0, 7):
    shares = [p.batch(step) for p in parts]
    assert all(s['tokens'].shape == (8 // count, 17) for s in shares)
    for k, v in full.batch(step).items():
      np.testing.assert_array_equal(np.concatenate([s[k] for s in shares]), v)


def test_seq_len_crops(train):
  crop = pipeline.BatchLoader(train, batch_size=4, seed=0, seq_len=8)
  full = pipeline.BatchLoader(train, batch_size=4, seed=0)
  np.testing.assert_array_equal(crop.batch(2)['tokens'],
                                full.batch(2)['tokens'][:, :9])


def test_eval_batches_deterministic(valid):
  a = pipeline.eval_batches(valid, batch_size=16, num_batches=3)
  b = pipeline.eval_batches(valid, batch_size=16, num_batches=3)
  assert len(a) == 3
  for x, y in zip(a, b):
    _assert_same_batch(x, y)
  want = np.stack([valid[i]['tokens'] for i in range(48)])
  np.testing.assert_array_equal(
      np.concatenate([x['tokens'] for x in a]), want)
  assert len(pipeline.eval_batches(valid, batch_size=16)) == 4
  share = pipeline.eval_batches(valid, batch_size=16, num_batches=3,
                                process_index=1, process_count=2)
  np.testing.assert_array_equal(share[2]['tokens'], a[2]['tokens'][8:])


@pytest.mark.parametrize('kwargs, names', [
    (dict(batch_size=6, process_count=4), ['batch_size', 'process_count']),
    (dict(batch_size=8, process_index=2, process_count=2), ['process_index']),
    (dict(batch_size=0), ['batch_size']),
    (dict(batch_size=8, seq_len=LEN), ['data.seq_len', str(LEN)]),
    (dict(batch_size=8, seq_len=0), ['data.seq_len']),
    (dict(batch_size=8, seed=-1), ['seed']),
])
def test_bad_loader_arguments(train, kwargs, names):
  with pytest.raises(ValueError) as err:
    pipeline.BatchLoader(train, **kwargs)
  for name in names:
    assert name in str(err.value)


def test_bad_eval_and_step_arguments(train, valid):
  with pytest.raises(ValueError, match='num_batches'):
    pipeline.eval_batches(valid, batch_size=16, num_batches=5)
  with pytest.raises(ValueError, match='data.seq_len'):
    pipeline.eval_batches(valid, batch_size=16, seq_len=100)
  with pytest.raises(ValueError, match='step'):
    pipeline.BatchLoader(train, batch_size=4).batch(-1)
  with pytest.raises(ValueError, match='empty'):
    pipeline.BatchLoader([], batch_size=4)
