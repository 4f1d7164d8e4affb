"""moejax data layer: synthetic mixture language, TFDS builders, grain loader.

Public API:
  SyntheticMixture, RESTART_EPS                   (moejax.data.synthetic)
  SyntheticMixtureBuilder, LocalTextBuilder, synthetic_mixture_config,
  local_text_config, make_builder, prepare_builder, load_source,
  ByteTextSource, text_chunks                      (moejax.data.builders)
  DataCacheError                                   (moejax.data.cache)
  BatchLoader, DomainSubset, eval_batches, stored_length
                                                   (moejax.data.pipeline)
"""

from moejax.data.builders import ByteTextSource
from moejax.data.builders import LocalTextBuilder
from moejax.data.builders import SyntheticMixtureBuilder
from moejax.data.builders import load_source
from moejax.data.builders import local_text_config
from moejax.data.builders import make_builder
from moejax.data.builders import prepare_builder
from moejax.data.builders import synthetic_mixture_config
from moejax.data.builders import text_chunks
from moejax.data.cache import DataCacheError
from moejax.data.pipeline import BatchLoader
from moejax.data.pipeline import DomainSubset
from moejax.data.pipeline import eval_batches
from moejax.data.pipeline import stored_length
from moejax.data.synthetic import RESTART_EPS
from moejax.data.synthetic import SyntheticMixture

__all__ = [
    'BatchLoader', 'ByteTextSource', 'DomainSubset', 'DataCacheError', 'LocalTextBuilder',
    'RESTART_EPS', 'SyntheticMixture', 'SyntheticMixtureBuilder',
    'eval_batches', 'load_source', 'local_text_config', 'make_builder',
    'prepare_builder', 'stored_length',
    'synthetic_mixture_config', 'text_chunks',
]
