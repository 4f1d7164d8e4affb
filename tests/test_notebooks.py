"""Executes every notebook in notebooks/ top to bottom, and checks that the
committed notebooks carry no outputs.

Each notebook runs in a fresh `python3` kernel (ipykernel) with the
repository root as working directory and MOEJAX_NOTEBOOK_SMALL=1, which the
notebooks read to keep every size tiny; TMPDIR points at the test's
tmp_path, and the test checks that a notebook leaves none of its own
`moejax_*` folders there (its run directories are its own to delete, in
Colab too), and XLA_FLAGS turns off XLA's CPU backend optimisations (half
the compile time). A cell error fails the test with the notebook, the cell's index and
source, and the traceback. The notebooks assert their own claims (e.g.
03_expert_parallelism: an all-to-all in the compiled step, the single-device
result), so a wrong result fails here as a cell error.
"""

import glob
import os
import re
import time

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'notebooks', '*.ipynb')))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
CELL_TIMEOUT_S = 300  # per cell; the slowest (training) takes ~20-40 s here
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(REPO, 'notebooks', name), as_version=4)


def _first_error(nb: nbformat.NotebookNode):
  """(index, cell, error output) of the first cell that raised, or None."""
  for index, cell in enumerate(nb.cells):
    for output in cell.get('outputs', []):
      if output.get('output_type') == 'error':
        return index, cell, output
  return None


def _failure_message(name: str, nb: nbformat.NotebookNode,
                     error: Exception) -> str:
  found = _first_error(nb)
  if found is None:  # e.g. a timeout or a dead kernel: no error output
    return f'{name}: {type(error).__name__}: {error}'
  index, cell, output = found
  traceback = _ANSI.sub('', '\n'.join(output.get('traceback', [])))
  return (f'{name}: cell {index} raised {output.get("ename")}: '
          f'{output.get("evalue")}\n--- cell {index} source ---\n'
          f'{cell.source}\n--- traceback ---\n{traceback}')


def test_notebooks_exist():
  assert NAMES, 'no notebooks found in notebooks/'


@pytest.mark.parametrize('name', NAMES)
def test_notebook_is_committed_clean(name):
  """No outputs, no execution counts, valid nbformat, a Colab badge."""
  nb = _read(name)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'
           and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, (f'{name}: cells {dirty} hold outputs or execution '
                     'counts; clear them before committing.')
  title = nb.cells[0]
  assert title.cell_type == 'markdown' and title.source.startswith('# ')
  link = re.search(r'https://colab\.research\.google\.com/github/[^/\s]+/'
                   r'[^/\s]+/blob/main/notebooks/' + re.escape(name) + r'\)',
                   title.source)
  assert link, f'{name}: the title cell has no Open in Colab link to itself'


def _github_repo(nb: nbformat.NotebookNode) -> str:
  """The GITHUB_REPO constant ('owner/name') of the notebook's setup cell."""
  found = [m.group(1) for cell in nb.cells if cell.cell_type == 'code'
           for m in re.finditer(r"^GITHUB_REPO = '([^'/\s]+/[^'/\s]+)'$",
                                cell.source, re.M)]
  assert len(found) == 1, f'{len(found)} GITHUB_REPO constants'
  return found[0]


@pytest.mark.parametrize('name', NAMES)
def test_colab_badge_and_clone_follow_one_constant(name):
  """The badge links to, and Colab clones, the repository GITHUB_REPO names,
  the same in every notebook."""
  nb = _read(name)
  repo = _github_repo(nb)
  assert repo == _github_repo(_read(NAMES[0]))
  badge = ('https://colab.research.google.com/github/'
           f'{repo}/blob/main/notebooks/{name})')
  assert badge in nb.cells[0].source
  assert "REPO_URL = f'https://github.com/{GITHUB_REPO}'" in ''.join(
      cell.source for cell in nb.cells)


@pytest.mark.parametrize('name', NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
  """Runs the notebook in the small setting; every cell must succeed."""
  monkeypatch.setenv('MOEJAX_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  # Compilation dominates the run time here; XLA's CPU backend compiles
  # about twice as fast without its LLVM optimisations (the same HLO
  # programs in less optimised machine code: slower to run, results equal
  # up to float rounding). A notebook that needs fake devices adds its own
  # flag (03_expert_parallelism).
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  nb = _read(name)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
      resources={'metadata': {'path': REPO}})
  start = time.time()
  try:
    client.execute()
  except (nbclient.exceptions.CellExecutionError,
          nbclient.exceptions.CellTimeoutError,
          nbclient.exceptions.DeadKernelError) as e:
    pytest.fail(_failure_message(name, nb, e), pytrace=False)
  print(f'{name}: {time.time() - start:.1f} s')
  # Only the notebook's own folders: TFDS leaves an empty tmp*tfds folder
  # whenever it builds a dataset (DatasetInfo.initialize_from_bucket).
  left = sorted(p for p in os.listdir(tmp_path) if p.startswith('moejax'))
  assert not left, f'{name}: left {left} in TMPDIR'
  images = sum('image/png' in output.get('data', {})
               for cell in nb.cells for output in cell.get('outputs', []))
  # Every notebook draws figures; none shown means the inline backend was
  # lost (e.g. a library switched matplotlib to Agg after %matplotlib).
  assert images > 0, f'{name}: executed, but displayed no figure'
