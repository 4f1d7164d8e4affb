"""Where a published number came from: the commit and the machine."""

from __future__ import annotations

import os
import platform
import subprocess

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit(repo: str = REPO) -> str:
  """The short HEAD commit of `repo`, '(plus uncommitted changes)' when the
  tracked files differ from it; 'unknown' outside a git checkout."""
  out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=repo,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    return 'unknown (not a git checkout)'
  dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files'
                          '=no'], cwd=repo, capture_output=True, text=True,
                         check=False).stdout.strip()
  return out.stdout.strip() + (' (plus uncommitted changes)' if dirty else '')


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else the platform's
  processor string."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def machine(device: str = '') -> str:
  """'Linux x86_64, <CPU model>, 2 CPU cores, Python 3.11.7, jax 0.10.2'
  (+ ', device <device>')."""
  text = (f'{platform.system()} {platform.machine()}, {cpu_model()}, '
          f'{os.cpu_count()} CPU cores, Python {platform.python_version()}, '
          f'jax {jax.__version__}')
  return text + (f', device {device}' if device else '')
