"""TFDS builders that work without TensorFlow (ArrayRecord files only).

Two builders are defined here, both storing the same per-example features:

* ``tokens``: Tensor [example_len] int32,
* ``domain``: Scalar int32 (-1 where unknown),
* ``optimal_nll``: Scalar float32 (NaN where unknown).

``SyntheticMixtureBuilder`` (``synthetic_mixture``) samples the
:class:`~moejax.data.synthetic.SyntheticMixture` language; ``LocalTextBuilder``
(``local_text``) byte-tokenises the user's own text files. Both are built
offline with ``file_format='array_record'`` and read back as random-access
data sources; ``tfds.features.Image`` and TFRecord would need TensorFlow, so
only ``Tensor`` / ``Scalar`` features are used.

Configs are parameterised: :func:`synthetic_mixture_config` and
:func:`local_text_config` derive a deterministic config name from every
setting, so different settings never collide in a ``data_dir``. Other
modules add builders of the same features with :func:`register_builder`
(``moejax.data.stdlib_text``: ``python_stdlib``, the running Python's
standard library).

:func:`load_source` / :func:`prepare_builder` build a dataset once, under
``<data_dir>/<name>/<config name>/<version>/``, and check it on every later
load (``moejax.data.cache``): a corrupt directory is deleted and rebuilt
with a warning naming the corrupt file. TFDS's routine notices are
silenced around these calls (``moejax.data.tfds_quiet``); a build prints
one ``data: built ...`` line.
"""

from __future__ import annotations

import dataclasses
import functools
import glob as glob_lib
import hashlib
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moejax.data import cache
from moejax.data.synthetic import SyntheticMixture
from moejax.data.tfds_quiet import QuietBuild
from moejax.data.tfds_quiet import quiet_tfds

_FILE_FORMAT = 'array_record'
_CHUNK = 4096  # examples generated per vectorised numpy call
_SPLIT_IDS = {'train': 1, 'validation': 2}


def example_features(example_len: int) -> tfds.features.FeaturesDict:
  """The features every builder here stores (see the module doc)."""
  return tfds.features.FeaturesDict({
      'tokens': tfds.features.Tensor(shape=(example_len,), dtype=np.int32),
      'domain': tfds.features.Scalar(dtype=np.int32),
      'optimal_nll': tfds.features.Scalar(dtype=np.float32),
  })


# --------------------------------------------------------------- synthetic
@functools.lru_cache(maxsize=4)
def _language(*args: Any) -> SyntheticMixture:
  """Shares one SyntheticMixture (and its cached tables) across splits."""
  return SyntheticMixture(*args)


@dataclasses.dataclass(eq=False)
class SyntheticMixtureConfig(tfds.core.BuilderConfig):
  """BuilderConfig of ``synthetic_mixture``; see :class:`SyntheticMixture`.

  ``example_len`` is the number of tokens per example (129 = 128 inputs plus
  the shifted target); ``num_train`` / ``num_eval`` are the sizes of the
  ``train`` / ``validation`` splits.
  """

  num_domains: int = 8
  vocab_size: int = 256
  support: int = 8
  alpha: float = 0.5
  seed: int = 0
  example_len: int = 129
  num_train: int = 20000
  num_eval: int = 1000


def synthetic_mixture_config(**kwargs: Any) -> SyntheticMixtureConfig:
  """Creates a ``synthetic_mixture`` config named after all its settings.

  Args:
    **kwargs: any of num_domains, vocab_size, support, alpha, seed,
      example_len, num_train, num_eval (defaults as in the config class).

  Returns:
    A config named e.g. ``d8_v256_s8_a0.5_seed0_len129_n20000_e1000``.
  """
  names = {f.name for f in dataclasses.fields(SyntheticMixtureConfig)}
  allowed = names - {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  unknown = set(kwargs) - allowed
  if unknown:
    raise ValueError(f'unknown synthetic_mixture arguments: {sorted(unknown)}')
  c = SyntheticMixtureConfig(name='tmp', **kwargs)
  if c.example_len < 2:
    raise ValueError(f'example_len must be >= 2, got {c.example_len}')
  if c.num_train < 1 or c.num_eval < 1:
    raise ValueError('num_train and num_eval must be >= 1, got '
                     f'{c.num_train}, {c.num_eval}')
  SyntheticMixture(c.num_domains, c.vocab_size, c.support, c.alpha, c.seed)
  c.name = (f'd{c.num_domains}_v{c.vocab_size}_s{c.support}_a{float(c.alpha)!r}'
            f'_seed{c.seed}_len{c.example_len}_n{c.num_train}_e{c.num_eval}')
  c.description = 'Synthetic mixture of sparse bigram domains.'
  return c


class SyntheticMixtureBuilder(QuietBuild, tfds.core.GeneratorBasedBuilder):
  """``synthetic_mixture``: samples of a :class:`SyntheticMixture`.

  Splits ``train`` (num_train examples) and ``validation`` (num_eval) are
  sampled from disjoint seeds ``(seed, 1, chunk)`` / ``(seed, 2, chunk)``;
  the language tables use ``seed`` itself. ``optimal_nll`` is the mean over
  the example's L - 1 predicted positions of the Bayes-optimal NLL. On a
  crop to the first k + 1 < L tokens it is a lower bound in expectation
  (the process is stationary, so the Bayes per-position NLL is
  non-increasing in position).
  """

  name = 'synthetic_mixture'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [synthetic_mixture_config()]
  # No download checksums. Also avoids tfds 4.9's code_path lookup, which
  # lazily imports the (py<3.9 only) `importlib_resources` package.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description='Mixture of sparse random bigram languages.',
        features=example_features(c.example_len),
        supervised_keys=None,
        disable_shuffling=True,  # Record i is example i.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline: nothing to download.
    c = self.builder_config
    sizes = {'train': c.num_train, 'validation': c.num_eval}
    return {s: self._generate_examples(s, sizes[s]) for s in sizes}

  def _generate_examples(self, split: str, num: int) -> Iterator[Any]:
    c = self.builder_config
    lang = _language(c.num_domains, c.vocab_size, c.support, c.alpha, c.seed)
    for chunk, lo in enumerate(range(0, num, _CHUNK)):
      n = min(_CHUNK, num - lo)
      rng = np.random.default_rng((c.seed, _SPLIT_IDS[split], chunk))
      tokens, domain = lang.sample(rng, n, c.example_len)
      nll = lang.optimal_nll(tokens).mean(axis=1).astype(np.float32)
      for i in range(n):
        yield lo + i, {'tokens': tokens[i], 'domain': domain[i],
                       'optimal_nll': nll[i]}


# -------------------------------------------------------------- local text
@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """BuilderConfig of ``local_text``.

  ``pattern`` is a glob (``**`` allowed) of text files, read as raw bytes in
  sorted path order; ``separator`` is the byte appended after every document;
  the last ``ceil(valid_fraction * num_chunks)`` chunks form ``validation``.
  """

  pattern: str = ''
  example_len: int = 129
  separator: int = 0
  valid_fraction: float = 0.05


def _text_files(pattern: str) -> list[str]:
  files = sorted(f for f in glob_lib.glob(pattern, recursive=True)
                 if os.path.isfile(f))
  if not files:
    raise ValueError(f'pattern {pattern!r} matches no files')
  return files


def local_text_config(pattern: str, **kwargs: Any) -> LocalTextConfig:
  """Creates a ``local_text`` config named after its settings and content.

  Args:
    pattern: glob of the text files (``**`` allowed).
    **kwargs: example_len (129), separator (byte 0..255, default 0),
      valid_fraction (0.05).

  Returns:
    A config named ``<sha256 of the files' bytes, 16 hex>_len129_sep0_val0.05``,
    so edited files or other settings produce a fresh dataset.
  """
  c = LocalTextConfig(name='tmp', pattern=pattern, **kwargs)
  if c.example_len < 2:
    raise ValueError(f'example_len must be >= 2, got {c.example_len}')
  if not 0 <= c.separator <= 255:
    raise ValueError(f'separator must be a byte 0..255, got {c.separator}')
  if not 0.0 < c.valid_fraction < 1.0:
    raise ValueError(f'valid_fraction must be in (0, 1), got {c.valid_fraction}')
  digest = hashlib.sha256()
  for path in _text_files(pattern):
    with open(path, 'rb') as f:
      digest.update(f.read())
    digest.update(bytes([c.separator]))
  c.name = (f'{digest.hexdigest()[:16]}_len{c.example_len}_sep{c.separator}'
            f'_val{float(c.valid_fraction)!r}')
  c.description = f'Byte chunks of {pattern}'
  return c


def byte_chunks(documents: Sequence[bytes], example_len: int,
                separator: int) -> np.ndarray:
  """Concatenates documents (each followed by ``separator``) into chunks.

  Args:
    documents: raw bytes, in the given order.
    example_len: L, bytes per chunk; the trailing partial chunk is dropped.
    separator: byte value appended after every document.

  Returns:
    [num_chunks, L] int32 array of byte values 0..255, num_chunks =
    (sum of len(document) + 1) // L.
  """
  sep = bytes([separator])
  data = np.frombuffer(b''.join(d + sep for d in documents), dtype=np.uint8)
  num = data.size // example_len
  return data[:num * example_len].reshape(num, example_len).astype(np.int32)


def text_chunks(files: Sequence[str], example_len: int,
                separator: int) -> np.ndarray:
  """:func:`byte_chunks` of files, read as raw bytes in the given order.

  Returns:
    [num_chunks, L] int32 array of byte values 0..255.
  """
  documents = []
  for path in files:
    with open(path, 'rb') as f:
      documents.append(f.read())
  return byte_chunks(documents, example_len, separator)


class LocalTextBuilder(QuietBuild, tfds.core.GeneratorBasedBuilder):
  """``local_text``: the user's text files as fixed-length byte sequences.

  Documents (files matched by ``pattern``, sorted) are concatenated, each
  followed by the ``separator`` byte, and cut into consecutive
  non-overlapping chunks of ``example_len`` bytes (remainder dropped).
  The last ceil(valid_fraction * num_chunks) chunks are ``validation``, the
  rest ``train``. ``tokens`` hold byte values 0..255 (vocab 256);
  ``domain`` is -1 and ``optimal_nll`` NaN (unknown). Build with a config
  from :func:`local_text_config`.
  """

  name = 'local_text'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = None  # See SyntheticMixtureBuilder.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Byte-level chunks of local text files.',
        features=example_features(self.builder_config.example_len),
        supervised_keys=None,
        disable_shuffling=True,  # Record i is example i.
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    chunks = text_chunks(_text_files(c.pattern), c.example_len, c.separator)
    if len(chunks) < 2:
      raise ValueError(f'{c.pattern!r} holds fewer than 2 chunks of '
                       f'{c.example_len} bytes')
    num_valid = min(int(np.ceil(c.valid_fraction * len(chunks))),
                    len(chunks) - 1)
    cut = len(chunks) - num_valid
    return {'train': self._generate_examples(chunks[:cut], 0),
            'validation': self._generate_examples(chunks[cut:], cut)}

  def _generate_examples(self, chunks: np.ndarray,
                         offset: int) -> Iterator[Any]:
    nan = np.float32(np.nan)
    for i, row in enumerate(chunks):
      yield offset + i, {'tokens': row, 'domain': np.int32(-1),
                         'optimal_nll': nan}


# ------------------------------------------------------------ data sources
class ByteTextSource:
  """Random-access view of a TFDS text dataset as fixed-length byte tokens.

  Record i maps ``source[i][text_key]`` (str is UTF-8 encoded, bytes are
  used as-is) to ``tokens`` [example_len] int32: the first example_len
  bytes, right-padded with ``pad`` when the document is shorter. ``domain``
  is -1 and ``optimal_nll`` NaN.
  """

  def __init__(self, source: Sequence[Any], text_key: str = 'text',
               example_len: int = 129, pad: int = 0):
    self._source = source
    self._key = text_key
    self._len = example_len
    self._pad = pad

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._source[index]
    if self._key not in record:
      raise KeyError(f'text_key {self._key!r} not in record keys '
                     f'{sorted(record)}')
    text = record[self._key]
    if isinstance(text, np.ndarray):
      text = text.item()
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    tokens = np.full(self._len, self._pad, dtype=np.int32)
    raw = np.frombuffer(data[:self._len], dtype=np.uint8)
    tokens[:raw.size] = raw
    return {'tokens': tokens, 'domain': np.int32(-1),
            'optimal_nll': np.float32(np.nan)}


# name -> (builder class, config factory): the datasets built here.
_BUILDERS: dict[str, tuple[type, Callable[..., tfds.core.BuilderConfig]]] = {
    'synthetic_mixture': (SyntheticMixtureBuilder, synthetic_mixture_config),
    'local_text': (LocalTextBuilder, local_text_config),
}


def register_builder(builder: type,
                     make_config: Callable[..., tfds.core.BuilderConfig]
                     ) -> None:
  """Adds a locally built dataset to make_builder / prepare_builder /
  load_source, under ``builder.name``.

  Protocol: ``builder`` is a ``GeneratorBasedBuilder`` (with ``QuietBuild``)
  storing :func:`example_features`, and ``make_config(**kwargs)``
  returns its config named after every setting and the source content (so
  changed settings or sources land in a new directory). A builder may list
  ``CHECKED_FILES``: JSON files of its directory, besides the shards, that
  :func:`prepare_builder` requires (else the directory is rebuilt).
  """
  _BUILDERS[builder.name] = (builder, make_config)


def built_names() -> tuple[str, ...]:
  """Names of the datasets built here (synthetic_mixture, local_text, ...)."""
  return tuple(_BUILDERS)


def _class_and_config(name: str, builder_kwargs: dict[str, Any]):
  """(builder class, BuilderConfig) of a registered dataset name."""
  if name not in _BUILDERS:
    raise ValueError(f'name must be one of {", ".join(_BUILDERS)}, got '
                     f'{name!r}')
  cls, make_config = _BUILDERS[name]
  return cls, make_config(**builder_kwargs)


def make_builder(name: str, data_dir: str,
                 **builder_kwargs: Any) -> tfds.core.DatasetBuilder:
  """Returns the builder of a dataset built here (unbuilt).

  Args:
    name: 'synthetic_mixture', 'local_text', 'python_stdlib' (see
      :func:`built_names`).
    data_dir: TFDS data directory.
    **builder_kwargs: config settings, see :func:`synthetic_mixture_config`,
      :func:`local_text_config` and
      ``moejax.data.stdlib_text.python_stdlib_config``.

  Returns:
    The DatasetBuilder; call ``download_and_prepare(file_format=
    'array_record')`` then ``as_data_source(split)``, or use
    :func:`prepare_builder`, which also checks and repairs the files.
  """
  return _instantiate(*_class_and_config(name, builder_kwargs), data_dir)


def _instantiate(cls, config, data_dir: str) -> tfds.core.DatasetBuilder:
  # A config equal to a predefined one must be passed by name.
  known = {c.name for c in cls.BUILDER_CONFIGS}
  with quiet_tfds():
    return cls(config=config.name if config.name in known else config,
               data_dir=data_dir, file_format=_FILE_FORMAT)


def _build(cls, config, data_dir: str,
           directory: str) -> tfds.core.DatasetBuilder:
  """The builder, prepared; a new build prints one line and gets its
  checksum file."""
  fresh = not os.path.isdir(directory)
  start = time.time()
  builder = _instantiate(cls, config, data_dir)
  with quiet_tfds():
    try:
      builder.download_and_prepare(file_format=_FILE_FORMAT)
    except Exception:  # another process may have built it meanwhile
      if not os.path.isdir(directory) or _problem(cls, directory):
        raise
  if fresh:
    cache.write_checksums(directory)
    sizes = ' + '.join(f'{s.num_examples} {s.name}'
                       for s in builder.info.splits.values())
    note = getattr(builder, 'build_note', None)  # e.g. the source's hash
    print(f'data: built {cls.name} ({sizes} examples) in {directory} '
          f'({time.time() - start:.1f} s)' + (f'; {note()}' if note else ''),
          flush=True)
  return builder


def _problem(cls, directory: str):
  """cache.find_problem of a builder's directory, with its CHECKED_FILES."""
  return cache.find_problem(directory, getattr(cls, 'CHECKED_FILES', ()))


def prepare_builder(name: str, data_dir: str,
                    **builder_kwargs: Any) -> tfds.core.DatasetBuilder:
  """Builds a dataset of :func:`built_names` if needed, checked.

  The prepared directory (``<data_dir>/<name>/<config>/<version>``) is
  checked first (``moejax.data.cache.find_problem``: metadata, record
  counts, checksums, the builder's ``CHECKED_FILES``). A corrupt one is
  deleted and rebuilt, with a warning on stderr naming the corrupt file:
  these datasets are generated locally, so nothing is lost.

  Args:
    name: 'synthetic_mixture', 'local_text' or 'python_stdlib'.
    data_dir: TFDS data directory.
    **builder_kwargs: as for :func:`make_builder`.

  Returns:
    The prepared builder.

  Raises:
    DataCacheError: the corrupt directory could not be deleted or is still
      corrupt after the rebuild; the message names the file and the
      directory to delete.
  """
  cls, config = _class_and_config(name, builder_kwargs)
  directory = cache.dataset_dir(data_dir, cls.name, config.name,
                                str(cls.VERSION))
  problem = _problem(cls, directory)
  if problem:
    print(f'warning: the {name} data cache is corrupt: {problem}; deleting '
          f'and rebuilding {directory}', file=sys.stderr, flush=True)
    cache.remove(directory, problem)
  builder = _build(cls, config, data_dir, directory)
  again = _problem(cls, directory) if problem else None
  if again:
    raise cache.DataCacheError(
        f'the {name} data cache is still corrupt after a rebuild ({again});'
        f' delete the directory {directory} and re-run.')
  return builder


def load_source(name: str, split: str, data_dir: str,
                **builder_kwargs: Any) -> Sequence[dict[str, Any]]:
  """Builds (if needed, offline) and opens a random-access data source.

  * ``synthetic_mixture``: kwargs go to :func:`synthetic_mixture_config`.
  * ``local_text``: kwargs go to :func:`local_text_config` (``pattern``
    required).
  * ``python_stdlib``: kwargs go to
    ``moejax.data.stdlib_text.python_stdlib_config`` (``root``,
    ``example_len``, ``separator``).
  * any other TFDS name: ``tfds.data_source(name, split=split,
    data_dir=data_dir, download=False)`` on a dataset the user has already
    prepared (as ArrayRecord), wrapped in :class:`ByteTextSource`; kwargs
    ``text_key`` ('text'), ``example_len`` (129), ``pad`` (0).

  The built ones (:func:`built_names`) are checked on every load and rebuilt when corrupt (see
  :func:`prepare_builder`).

  Args:
    name: dataset name.
    split: split, e.g. 'train', 'validation', 'train[:10%]'.
    data_dir: TFDS data directory (datasets are built under it).
    **builder_kwargs: as above.

  Returns:
    Sequence of records {'tokens': [L] int32, 'domain': int32,
    'optimal_nll': float32} with L = example_len.
  """
  if name in _BUILDERS:
    builder = prepare_builder(name, data_dir, **builder_kwargs)
    with quiet_tfds():
      return builder.as_data_source(split=split)
  wrap = {k: builder_kwargs.pop(k) for k in ('text_key', 'example_len', 'pad')
          if k in builder_kwargs}
  if builder_kwargs:
    raise ValueError(f'unknown arguments for {name!r}: {sorted(builder_kwargs)}')
  source = tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  return ByteTextSource(source, **wrap)
