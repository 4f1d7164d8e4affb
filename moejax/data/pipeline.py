"""Deterministic, resumable batching on top of ``grain.MapDataset``.

The training stream is ``source -> shuffle(seed) -> repeat() -> batch``,
where ``repeat`` reshuffles every epoch (grain combines the seed with the
epoch number). Because a ``MapDataset`` is random access, batch ``t`` is a
pure function of ``(seed, t)``: a run resumed at step t sees exactly the
batches an uninterrupted run would, with no iterator state to checkpoint.

Multi-host: the global batch of step t is the B consecutive elements
``[t * B, (t + 1) * B)`` of the shuffled stream; process p of P reads only
rows ``[p * B / P, (p + 1) * B / P)`` of it, i.e. local batch ``t * P + p`` of
the stream batched by B / P. The concatenation over p is the global batch.

Batches are dicts ``{'tokens': [b, L] int32, 'domain': [b] int32,
'optimal_nll': [b] float32}`` with b = B / P and L = seq_len + 1 (inputs are
``tokens[:, :-1]``, targets ``tokens[:, 1:]``). Records lacking ``domain`` /
``optimal_nll`` get -1 / NaN.
"""

from __future__ import annotations

import collections
import collections.abc
from concurrent import futures
import functools
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

Batch = dict[str, np.ndarray]


def _collate(records: Sequence[Mapping[str, Any]], length: int) -> Batch:
  """Stacks records, crops tokens to ``length``, fixes dtypes."""
  tokens = np.stack([np.asarray(r['tokens'])[:length] for r in records])
  domain = [r.get('domain', -1) for r in records]
  nll = [r.get('optimal_nll', np.nan) for r in records]
  return {'tokens': tokens.astype(np.int32),
          'domain': np.asarray(domain, dtype=np.int32),
          'optimal_nll': np.asarray(nll, dtype=np.float32)}


def stored_length(source: Sequence[Mapping[str, Any]]) -> int:
  """Returns the number of tokens per stored example.

  Args:
    source: random-access source of records with 'tokens' [L_stored].

  Returns:
    L_stored (read from record 0).
  """
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError('source is empty')
  return int(np.asarray(source[0]['tokens']).shape[-1])


def _check_args(source, batch_size: int, seq_len: int | None,
                process_index: int, process_count: int) -> int:
  """Validates the common arguments; returns the resolved seq_len."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if process_count < 1:
    raise ValueError(f'process_count must be >= 1, got {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, process_count='
                     f'{process_count}), got {process_index}')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} is not divisible by '
                     f'process_count={process_count}')
  stored = stored_length(source)
  if seq_len is None:
    seq_len = stored - 1
  if seq_len < 1:
    raise ValueError(f'data.seq_len must be >= 1, got {seq_len}')
  if seq_len + 1 > stored:
    raise ValueError(
        f'data.seq_len={seq_len} needs seq_len + 1 = {seq_len + 1} tokens '
        f'per example, but the stored example length is {stored}')
  return seq_len


class BatchLoader:
  """Random-access loader: ``batch(step)`` is a pure function of (seed, step).

  Args (constructor):
    source: random-access source (``len`` and ``[i]``) of records with
      'tokens' [L_stored] (and optionally 'domain', 'optimal_nll').
    batch_size: B, the GLOBAL batch size (all processes together).
    seed: shuffle seed in [0, 2**32).
    seq_len: tokens per example minus one; batches hold L = seq_len + 1
      tokens (the first L of each record). Default L_stored - 1.
    process_index: p, this process's index in [0, P).
    process_count: P, number of processes; must divide B.
    shuffle: shuffle (reshuffled every epoch); False keeps storage order.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], *, batch_size: int,
               seed: int = 0, seq_len: int | None = None,
               process_index: int = 0, process_count: int = 1,
               shuffle: bool = True):
    self.seq_len = _check_args(source, batch_size, seq_len, process_index,
                               process_count)
    if shuffle and not 0 <= seed < 2**32:
      raise ValueError(f'seed must be in [0, 2**32), got {seed}')
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.local_batch_size = batch_size // process_count
    self.num_examples = len(source)
    ds = grain.MapDataset.source(source)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat()  # Infinite; reshuffles each epoch.
    collate = functools.partial(_collate, length=self.seq_len + 1)
    self._ds = ds.batch(self.local_batch_size, drop_remainder=True,
                        batch_fn=collate)

  @property
  def steps_per_epoch(self) -> float:
    """Global batches per pass over the source (may be fractional)."""
    return self.num_examples / self.batch_size

  def batch(self, step: int) -> Batch:
    """Returns this process's share of global batch ``step``.

    Args:
      step: global step t >= 0.

    Returns:
      {'tokens': [B/P, L] int32, 'domain': [B/P] int32,
       'optimal_nll': [B/P] float32}: rows [p*B/P, (p+1)*B/P) of the global
      batch made of stream elements [t*B, (t+1)*B).
    """
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    return self._ds[int(step) * self.process_count + self.process_index]

  def iterate(self, start_step: int = 0,
              prefetch: int = 2) -> Iterator[Batch]:
    """Yields ``batch(t)`` for t = start_step, start_step + 1, ... forever.

    Args:
      start_step: first step (e.g. the step restored from a checkpoint).
      prefetch: batches loaded ahead in a background thread (0: none). The
        output does not depend on it.

    Returns:
      Iterator of batches as in :meth:`batch`.
    """
    if prefetch < 0:
      raise ValueError(f'prefetch must be >= 0, got {prefetch}')
    step = start_step
    if prefetch == 0:
      while True:
        yield self.batch(step)
        step += 1
    with futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = collections.deque(
          pool.submit(self.batch, start_step + k) for k in range(prefetch))
      while True:
        pending.append(pool.submit(self.batch, step + prefetch))
        yield pending.popleft().result()
        step += 1


def eval_batches(source: Sequence[Mapping[str, Any]], *, batch_size: int,
                 num_batches: int | None = None, seq_len: int | None = None,
                 process_index: int = 0,
                 process_count: int = 1) -> list[Batch]:
  """Fixed, deterministic eval batches: the first examples, no shuffling.

  Global eval batch k holds stored examples [k*B, (k+1)*B); this process
  gets rows [p*B/P, (p+1)*B/P) of each.

  Args:
    source: random-access source (e.g. the validation split).
    batch_size: B, global batch size; process_count must divide it.
    num_batches: number of batches; default all full batches len(source)//B.
    seq_len: as in :class:`BatchLoader`.
    process_index: p in [0, P).
    process_count: P.

  Returns:
    List of num_batches dicts {'tokens': [B/P, L] int32, 'domain': [B/P]
    int32, 'optimal_nll': [B/P] float32}.
  """
  loader = BatchLoader(source, batch_size=batch_size, seq_len=seq_len,
                       process_index=process_index,
                       process_count=process_count, shuffle=False)
  available = len(source) // batch_size
  if num_batches is None:
    num_batches = available
  if num_batches < 1 or num_batches > available:
    raise ValueError(
        f'num_batches must be in [1, {available}] (len(source)={len(source)},'
        f' batch_size={batch_size}), got {num_batches}')
  return [loader.batch(k) for k in range(num_batches)]


class DomainSubset(collections.abc.Sequence):
  """The records of `source` whose 'domain' is in `domains`, in order.

  A random-access view (the index list is built once by reading every
  record's domain), e.g. to train on some domains of the synthetic mixture
  and fine-tune on the others.

  Args (constructor):
    source: random-access records with an int 'domain'.
    domains: the domain ids to keep (non-empty).
  """

  def __init__(self, source: Sequence[Mapping[str, Any]],
               domains: Sequence[int]):
    keep = set(int(d) for d in domains)
    self.source = source
    self.index = [i for i in range(len(source))
                  if int(np.asarray(source[i]['domain'])) in keep]

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self.source[self.index[i]]
