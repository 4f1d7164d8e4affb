"""``python_stdlib``: the running Python's standard library as a text corpus.

Real text that every Python install carries (PSF licence), built offline
into the same ArrayRecord features as the other builders (``tokens``
[example_len] int32 bytes 0..255, ``domain`` int32, ``optimal_nll`` NaN).

Documents (:func:`stdlib_files`, :func:`documents`), under ``root``
(default ``sysconfig.get_paths()['stdlib']``, e.g. ``.../lib/python3.11``):

* code: every ``*.py`` file, found by walking ``root`` in sorted order and
  skipping the directories named in ``EXCLUDED_DIRS`` (test suites:
  ``test``, ``tests``, ``idle_test``; installed packages:
  ``site-packages``, ``dist-packages``; ``__pycache__``) or starting with
  ``config-`` (the build's Makefile directory), and the generated
  ``_sysconfigdata_*.py`` build settings. One document per file, its raw
  bytes.
* prose: ``pydoc_data/topics.py`` is not taken as code: each entry of its
  ``topics`` dict (the language reference and library docs text that
  ``help()`` shows) is one document, UTF-8, named
  ``pydoc_data/topics.py:<topic>``.

Domains (``DOMAINS``, ids fixed): prose is 0; a code file's domain is that
of its top-level name (``asyncio/base_events.py`` -> ``asyncio``,
``json/decoder.py`` -> ``json``, ``smtplib.py`` -> ``smtplib``) in the
``_TOP_LEVEL`` table, else ``core`` (the runtime and general library:
collections, typing, os, pathlib, logging, ctypes, decimal, ...).

Split: by document, from its name only (not its content): a document is in
``validation`` when ``sha256(name) % VALID_EVERY == 0`` (about 1 in 20),
else ``train``; no document straddles the splits and an edited file keeps
its split.

Examples: per split and domain, the documents in name order, each followed
by the ``separator`` byte, are concatenated and cut into chunks of
``example_len`` bytes (``builders.byte_chunks``; each stream's trailing
partial chunk is dropped), so a chunk may span documents but never domains.
A split stores its chunks in a fixed pseudo-random order (seeded by the
split), so any prefix (the eval's first batches) is a sample of every
domain.

Provenance: the config name holds the first 16 hex digits of
``content_sha256``, the SHA-256 of the sorted (relative path, bytes) list
of the source files (:func:`content_hash`), so a changed, added or removed
file builds a new dataset (old ones stay, under their own names). The
full hash, the Python version (of the interpreter whose stdlib it is), the
root, the file count and per split / per domain documents, bytes and
examples are stored in ``metadata.json`` (``builder.info.metadata``) and in
the ``dataset_info.json`` description; :func:`corpus_info` reads them and
:func:`describe` makes the one line for a results table.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import platform
import sysconfig
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moejax.data import builders
from moejax.data.tfds_quiet import QuietBuild

DOMAINS = ('prose', 'concurrency', 'internet', 'data_formats', 'tooling',
           'gui', 'text', 'core')
# Top-level module / package name -> domain. Unlisted names are 'core'.
_TOP_LEVEL = {
    'concurrency': (
        'asyncio', 'concurrent', 'multiprocessing', 'threading',
        '_threading_local', 'queue', 'sched', 'selectors', 'subprocess',
        'signal', 'asyncore', 'asynchat', 'contextvars'),
    'internet': (
        'email', 'http', 'urllib', 'xmlrpc', 'wsgiref', 'html', 'smtplib',
        'smtpd', 'imaplib', 'poplib', 'ftplib', 'nntplib', 'telnetlib',
        'socket', 'socketserver', 'ssl', 'mailbox', 'mimetypes', 'mailcap',
        'cgi', 'cgitb', 'webbrowser', 'netrc', 'ipaddress', 'quopri', 'uu',
        'base64'),
    'data_formats': (
        'json', 'xml', 'csv', 'tomllib', 'plistlib', 'configparser',
        'pickle', 'pickletools', '_compat_pickle', 'copyreg', 'shelve',
        'dbm', 'sqlite3', 'struct', 'zipfile', 'tarfile', 'gzip', 'bz2',
        'lzma', '_compression', 'zipimport', 'chunk', 'wave', 'aifc',
        'sunau', 'imghdr', 'sndhdr', 'xdrlib'),
    'tooling': (
        'unittest', 'doctest', 'lib2to3', 'distutils', 'importlib',
        'ensurepip', 'venv', 'pydoc', 'pydoc_data', 'pdb', 'bdb', 'ast',
        'dis', 'tokenize', 'token', 'keyword', 'opcode', 'inspect',
        'symtable', 'py_compile', 'compileall', 'codeop', 'code',
        'modulefinder', 'pyclbr', 'tabnanny', 'trace', 'traceback',
        'profile', 'cProfile', 'pstats', 'timeit', 'runpy', 'pkgutil',
        'zipapp', 'site', 'sysconfig', '__future__', 'tracemalloc',
        'linecache', 'rlcompleter', 'imp'),
    'gui': ('tkinter', 'idlelib', 'turtledemo', 'turtle', 'curses'),
    'text': (
        'encodings', 're', 'sre_compile', 'sre_parse', 'sre_constants',
        'string', 'textwrap', 'difflib', 'codecs', 'stringprep', 'locale',
        'gettext', '_strptime', 'fnmatch', 'glob', 'shlex', 'reprlib',
        'pprint'),
}
_DOMAIN_OF = {top: DOMAINS.index(d) for d, tops in _TOP_LEVEL.items()
              for top in tops}
assert len(_DOMAIN_OF) == sum(map(len, _TOP_LEVEL.values())), 'duplicates'
PROSE, CORE = DOMAINS.index('prose'), DOMAINS.index('core')

EXCLUDED_DIRS = ('test', 'tests', 'idle_test', 'site-packages',
                 'dist-packages', '__pycache__')
TOPICS_FILE = 'pydoc_data/topics.py'
VALID_EVERY = 20  # 1 document in 20 (by name hash) is validation
METADATA_FILE = 'metadata.json'
_SPLIT_IDS = {'train': 1, 'validation': 2}  # seeds of the stored order


def default_root() -> str:
  """The running interpreter's standard library directory."""
  return sysconfig.get_paths()['stdlib']


def _skip_dir(name: str) -> bool:
  return name in EXCLUDED_DIRS or name.startswith('config-')


def stdlib_files(root: str) -> list[str]:
  """The source files of the corpus (see the module doc for the rule).

  Args:
    root: a standard library directory.

  Returns:
    Relative '/'-separated paths of the ``*.py`` files, sorted (by code
    point, so the same on every platform); includes ``TOPICS_FILE`` if
    present.

  Raises:
    ValueError: root is not a directory or holds no such file.
  """
  if not os.path.isdir(root):
    raise ValueError(f'root {root!r} is not a directory')
  files = []
  for path, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if not _skip_dir(d)]  # prune: no descent
    rel = os.path.relpath(path, root).replace(os.sep, '/')
    prefix = '' if rel == '.' else rel + '/'
    files += [prefix + n for n in names if n.endswith('.py') and
              not n.startswith('_sysconfigdata_')]
  if not files:
    raise ValueError(f'root {root!r} holds no *.py files outside '
                     f'{", ".join(EXCLUDED_DIRS)}')
  return sorted(files)


def domain_of(name: str) -> int:
  """Domain id of a document name (a relative path or a topic name)."""
  if name.startswith(TOPICS_FILE + ':'):
    return PROSE
  top = name.split('/', 1)[0]
  return _DOMAIN_OF.get(top[:-3] if top.endswith('.py') else top, CORE)


def is_validation(name: str) -> bool:
  """Whether the document `name` is in the validation split."""
  digest = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') % VALID_EVERY == 0


def _read(root: str, files: Sequence[str]) -> list[bytes]:
  out = []
  for rel in files:
    with open(os.path.join(root, *rel.split('/')), 'rb') as f:
      out.append(f.read())
  return out


def content_hash(files: Sequence[str], contents: Sequence[bytes]) -> str:
  """SHA-256 (hex) of the (relative path, bytes) list, in the given order.

  Each entry adds ``path (UTF-8), 0x00, len(bytes) (8 bytes, little
  endian), bytes``, so moving bytes between files or renaming one changes
  it too.
  """
  digest = hashlib.sha256()
  for rel, data in zip(files, contents, strict=True):
    digest.update(rel.encode('utf-8') + b'\0')
    digest.update(len(data).to_bytes(8, 'little') + data)
  return digest.hexdigest()


def pydoc_topics(source: bytes) -> dict[str, str]:
  """The ``topics`` dict literal of a ``pydoc_data/topics.py`` (not run).

  Raises:
    ValueError: the file assigns no ``topics`` dict literal.
  """
  for node in ast.parse(source).body:
    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        and any(isinstance(t, ast.Name) and t.id == 'topics'
                for t in node.targets)):
      topics = ast.literal_eval(node.value)
      if all(isinstance(v, str) for v in topics.values()):
        return topics
  raise ValueError(f'{TOPICS_FILE} has no `topics = {{str: str}}` literal')


def documents(files: Sequence[str],
              contents: Sequence[bytes]) -> list[tuple[str, int, bytes]]:
  """(name, domain id, bytes) of every document, sorted by name.

  ``TOPICS_FILE`` becomes one prose document per topic; every other file
  one code document.
  """
  docs = []
  for rel, data in zip(files, contents, strict=True):
    if rel == TOPICS_FILE:
      docs += [(f'{rel}:{k}', PROSE, v.encode('utf-8'))
               for k, v in pydoc_topics(data).items()]
    else:
      docs.append((rel, domain_of(rel), data))
  return sorted(docs, key=lambda doc: doc[0])


@dataclasses.dataclass(eq=False)
class PythonStdlibConfig(tfds.core.BuilderConfig):
  """BuilderConfig of ``python_stdlib`` (made by :func:`python_stdlib_config`).

  ``root``: the library directory; ``example_len``: bytes per example;
  ``separator``: the byte after every document; ``content_sha256``,
  ``num_files``: of :func:`stdlib_files` at config time;
  ``python_version``: the running interpreter's when ``root`` is its
  stdlib, else '' (unknown).
  """

  root: str = ''
  example_len: int = 129
  separator: int = 0
  content_sha256: str = ''
  num_files: int = 0
  python_version: str = ''


def python_stdlib_config(root: Optional[str] = None, example_len: int = 129,
                         separator: int = 0) -> PythonStdlibConfig:
  """Creates a ``python_stdlib`` config named after its settings and content.

  Args:
    root: the standard library directory (default: :func:`default_root`);
      tests pass a temp dir laid out the same way.
    example_len: L, bytes per example (>= 2).
    separator: byte 0..255 appended after every document.

  Returns:
    A config named ``<content sha256, 16 hex>_len<L>_sep<separator>``.
  """
  if example_len < 2:
    raise ValueError(f'example_len must be >= 2, got {example_len}')
  if not 0 <= separator <= 255:
    raise ValueError(f'separator must be a byte 0..255, got {separator}')
  root = os.path.abspath(os.path.expanduser(root or default_root()))
  files = stdlib_files(root)
  sha = content_hash(files, _read(root, files))
  ours = os.path.realpath(root) == os.path.realpath(default_root())
  c = PythonStdlibConfig(
      name=f'{sha[:16]}_len{example_len}_sep{separator}', root=root,
      example_len=example_len, separator=separator, content_sha256=sha,
      num_files=len(files),
      python_version=platform.python_version() if ours else '')
  c.description = f'Python {c.python_version or "?"} stdlib at {root}'
  return c


def _split_chunks(docs: Sequence[tuple[str, int, bytes]], split: str,
                  example_len: int, separator: int
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(tokens [N, L] int32, domain [N] int32, stats) of one split, stored
  order; stats: documents / bytes / examples in total and per domain."""
  valid = split == 'validation'
  tokens, labels, per_domain = [], [], {}
  for d, name in enumerate(DOMAINS):
    mine = [data for doc, dom, data in docs
            if dom == d and is_validation(doc) == valid]
    chunks = builders.byte_chunks(mine, example_len, separator)
    tokens.append(chunks)
    labels.append(np.full(len(chunks), d, np.int32))
    per_domain[name] = {'documents': len(mine),
                        'bytes': sum(len(m) + 1 for m in mine),
                        'examples': len(chunks)}
  tokens, labels = np.concatenate(tokens), np.concatenate(labels)
  order = np.random.default_rng((0, _SPLIT_IDS[split])).permutation(
      len(labels))
  stats = {k: sum(v[k] for v in per_domain.values())
           for k in ('documents', 'bytes', 'examples')}
  return tokens[order], labels[order], dict(stats, per_domain=per_domain)


class PythonStdlibBuilder(QuietBuild, tfds.core.GeneratorBasedBuilder):
  """``python_stdlib``: the standard library's code and pydoc topics as
  byte examples with a domain label per example (see the module doc).

  Build with a config from :func:`python_stdlib_config`. The provenance
  (``metadata.json``) is required on every load: without it the directory
  is rebuilt (``CHECKED_FILES``).
  """

  name = 'python_stdlib'
  VERSION = tfds.core.Version('1.0.0')  # bump when a rule above changes
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CHECKED_FILES = (METADATA_FILE,)
  code_path = None  # See builders.SyntheticMixtureBuilder.

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'Byte-level chunks of the Python '
                     f'{c.python_version or "?"} standard library at '
                     f'{c.root} (sha256 {c.content_sha256}).'),
        features=builders.example_features(c.example_len),
        supervised_keys=None,
        disable_shuffling=True,  # Record i is example i.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline: nothing to download.
    c = self.builder_config
    files = stdlib_files(c.root)
    contents = _read(c.root, files)
    sha = content_hash(files, contents)
    if sha != c.content_sha256:
      raise ValueError(f'the files under {c.root} changed while the '
                       'python_stdlib dataset was built; run again')
    docs = documents(files, contents)
    out, splits = {}, {}
    for split in _SPLIT_IDS:
      tokens, labels, splits[split] = _split_chunks(
          docs, split, c.example_len, c.separator)
      if not len(labels):  # pylint: disable=g-explicit-length-test
        raise ValueError(f'root {c.root!r}: the {split} split holds no '
                         f'example of {c.example_len} bytes')
      out[split] = self._generate_examples(tokens, labels)
    self.info.metadata.update(
        python_version=c.python_version, root=c.root, content_sha256=sha,
        num_files=len(files), example_len=c.example_len,
        separator=c.separator, domains=list(DOMAINS),
        valid_every=VALID_EVERY, splits=splits)
    return out

  def _generate_examples(self, tokens: np.ndarray,
                         labels: np.ndarray) -> Iterator[Any]:
    nan = np.float32(np.nan)
    for i, (row, label) in enumerate(zip(tokens, labels)):
      yield i, {'tokens': row, 'domain': label, 'optimal_nll': nan}

  def build_note(self) -> str:
    """The provenance line printed after a build."""
    return describe(corpus_info(self))


builders.register_builder(PythonStdlibBuilder, python_stdlib_config)


def corpus_info(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The provenance and size of a prepared ``python_stdlib`` dataset.

  Args:
    builder: e.g. ``builders.prepare_builder('python_stdlib', data_dir)``.

  Returns:
    {'python_version', 'root', 'content_sha256', 'num_files',
    'example_len', 'separator', 'domains', 'valid_every', 'splits':
    {split: {'documents', 'bytes', 'examples', 'per_domain': {domain:
    {'documents', 'bytes', 'examples'}}}}}; bytes count each document's
    separator, and are the split's byte tokens.
  """
  info = dict(builder.info.metadata or {})
  if 'content_sha256' not in info:
    raise ValueError(f'{builder.name} at {builder.data_dir} has no '
                     f'provenance ({METADATA_FILE}); delete it and rebuild')
  return info


def stdlib_corpus_info(data_dir: str, **kwargs: Any) -> dict[str, Any]:
  """:func:`corpus_info` of ``python_stdlib``, built under data_dir if
  needed; kwargs as for :func:`python_stdlib_config`."""
  return corpus_info(builders.prepare_builder('python_stdlib', data_dir,
                                              **kwargs))


def describe(info: Mapping[str, Any]) -> str:
  """One line for a results table, e.g. ``python_stdlib: Python 3.11.7
  stdlib, sha256 1f0c..., 734 files, 11.6M train + 0.6M validation byte
  tokens``."""
  version = info['python_version']
  source = (f'Python {version} stdlib' if version else
            f'stdlib at {info["root"]}')
  sizes = ' + '.join(f'{s["bytes"] / 1e6:.1f}M {name}'
                     for name, s in info['splits'].items())
  return (f'python_stdlib: {source}, sha256 {info["content_sha256"][:16]}, '
          f'{info["num_files"]} files, {sizes} byte tokens')
