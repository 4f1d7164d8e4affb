"""moejax.expert_parallel, split from moejax.sharding: the old names still
work (the same objects), either module can be imported first, and the
module sizes stay under the 500-line guideline."""

import os
import subprocess
import sys

import pytest

from moejax import expert_parallel
from moejax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
NAMES = ('expert_parallel_apply', 'expert_parallel_ffn',
         'expert_parallel_mesh')


@pytest.mark.parametrize('name', NAMES)
def test_sharding_re_exports_the_same_function(name):
  assert getattr(sharding, name) is getattr(expert_parallel, name)
  assert getattr(sharding, name).__module__ == 'moejax.expert_parallel'


@pytest.mark.parametrize('first', ['moejax.expert_parallel',
                                   'moejax.sharding'])
def test_either_module_imports_first(first):
  code = (f'import {first}\n'
          'from moejax.sharding import expert_parallel_ffn\n'
          'from moejax.expert_parallel import expert_parallel_ffn as f\n'
          'assert f is expert_parallel_ffn\n')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr


@pytest.mark.parametrize('path', ['moejax/sharding.py',
                                  'moejax/expert_parallel.py'])
def test_module_is_under_500_lines(path):
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    assert len(f.readlines()) < 500
