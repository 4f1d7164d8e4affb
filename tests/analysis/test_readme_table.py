"""experiments.readme_table: rewriting a README between markers."""

import pytest

from experiments import readme_table
from moejax.analysis import report

README = """# Title

Intro text.

<!-- baselines:experts:begin -->
| old | table |
<!-- baselines:experts:end -->

Between.

<!-- baselines:capacity:begin -->
<!-- baselines:capacity:end -->
Tail without a final newline"""


def _results(body):
  return f'# Sweep\n\n{report.SUMMARY_BEGIN}\n{body}\n{report.SUMMARY_END}\n'


def test_rewrites_only_between_markers(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text(README)
  (tmp_path / 'a.md').write_text(_results('Command: `a`\n\n| new | A |'))
  (tmp_path / 'b.md').write_text(_results('| new | B |'))
  argv = [str(readme), f'experts={tmp_path / "a.md"}',
          f'capacity={tmp_path / "b.md"}']
  assert readme_table.main(argv) == 0
  expected = README.replace(
      '| old | table |\n', 'Command: `a`\n\n| new | A |\n').replace(
          '<!-- baselines:capacity:begin -->\n',
          '<!-- baselines:capacity:begin -->\n| new | B |\n')
  assert readme.read_text() == expected
  # Idempotent, and --check agrees.
  assert readme_table.main(argv) == 0
  assert readme.read_text() == expected
  assert readme_table.main(argv + ['--check']) == 0
  (tmp_path / 'b.md').write_text(_results('| newer | B |'))
  assert readme_table.main(argv + ['--check']) == 1
  assert readme.read_text() == expected  # --check writes nothing


@pytest.mark.parametrize('text,message', [
    ('no markers', 'exactly once; found it 0 times'),
    ('<!-- baselines:experts:begin -->\n<!-- baselines:experts:begin -->\n'
     '<!-- baselines:experts:end -->', 'found it 2 times'),
    ('<!-- baselines:experts:end -->\n<!-- baselines:experts:begin -->',
     'comes before'),
])
def test_bad_readme_markers(text, message):
  with pytest.raises(ValueError, match=message):
    readme_table.replace_table(text, 'experts', 'x')


def test_cli_errors_exit_2(tmp_path, capsys):
  readme = tmp_path / 'README.md'
  readme.write_text(README)
  (tmp_path / 'r.md').write_text('# no summary block\n')
  assert readme_table.main([str(readme), f'experts={tmp_path / "r.md"}']) == 2
  assert 'moejax-sweep-summary:begin' in capsys.readouterr().err
  assert readme_table.main([str(readme), 'experts']) == 2
  assert 'NAME=RESULTS_MD' in capsys.readouterr().err
  assert readme.read_text() == README


@pytest.mark.parametrize('argv, needle', [
    (['README.md'], 'the following arguments are required: tables'),
    (['README.md', 'experts=r.md', '--dry_run'],
     'unrecognized arguments: --dry_run'),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, argv, needle):
  with pytest.raises(SystemExit) as exit_info:  # cli.Parser
    readme_table.main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.splitlines() == [f'error: {needle} (see --help)']
