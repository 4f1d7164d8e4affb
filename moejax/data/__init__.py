"""moejax data layer: synthetic mixture language, TFDS builders, grain loader.

Public API:
  SyntheticMixture, RESTART_EPS                   (moejax.data.synthetic)
  SyntheticMixtureBuilder, LocalTextBuilder, synthetic_mixture_config,
  local_text_config, make_builder, prepare_builder, load_source,
  ByteTextSource, byte_chunks, text_chunks, register_builder, built_names
                                                   (moejax.data.builders)
  PythonStdlibBuilder, python_stdlib_config, stdlib_corpus_info,
  describe_corpus, STDLIB_DOMAINS                  (moejax.data.stdlib_text)
  DataCacheError                                   (moejax.data.cache)
  BatchLoader, DomainSubset, eval_batches, stored_length
                                                   (moejax.data.pipeline)
"""

from moejax.data.builders import ByteTextSource
from moejax.data.builders import LocalTextBuilder
from moejax.data.builders import SyntheticMixtureBuilder
from moejax.data.builders import built_names
from moejax.data.builders import byte_chunks
from moejax.data.builders import load_source
from moejax.data.builders import local_text_config
from moejax.data.builders import make_builder
from moejax.data.builders import prepare_builder
from moejax.data.builders import register_builder
from moejax.data.builders import synthetic_mixture_config
from moejax.data.builders import text_chunks
from moejax.data.cache import DataCacheError
from moejax.data.pipeline import BatchLoader
from moejax.data.pipeline import DomainSubset
from moejax.data.pipeline import eval_batches
from moejax.data.pipeline import stored_length
from moejax.data.stdlib_text import DOMAINS as STDLIB_DOMAINS
from moejax.data.stdlib_text import PythonStdlibBuilder
from moejax.data.stdlib_text import describe as describe_corpus
from moejax.data.stdlib_text import python_stdlib_config
from moejax.data.stdlib_text import stdlib_corpus_info
from moejax.data.synthetic import RESTART_EPS
from moejax.data.synthetic import SyntheticMixture

__all__ = [
    'BatchLoader', 'ByteTextSource', 'DomainSubset', 'DataCacheError', 'LocalTextBuilder',
    'PythonStdlibBuilder', 'RESTART_EPS', 'STDLIB_DOMAINS', 'SyntheticMixture',
    'SyntheticMixtureBuilder', 'built_names', 'byte_chunks', 'describe_corpus',
    'eval_batches', 'load_source', 'local_text_config', 'make_builder',
    'prepare_builder', 'python_stdlib_config', 'register_builder',
    'stdlib_corpus_info', 'stored_length', 'synthetic_mixture_config',
    'text_chunks',
]
