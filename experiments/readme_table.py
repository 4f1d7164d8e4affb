"""Copies the summary tables of sweeps' results.md into a README.

    python -m experiments.readme_table README.md \
        experts=runs/sweeps/switch_small_experts/results.md \
        capacity=runs/sweeps/switch_small_capacity/results.md [--check]

For each NAME=RESULTS pair, the text between the README markers

    <!-- baselines:NAME:begin -->
    <!-- baselines:NAME:end -->

(each on its own line, once) is replaced by the summary block of RESULTS:
what `experiments.sweep` writes between `<!-- moejax-sweep-summary:begin
-->` and `<!-- moejax-sweep-summary:end -->` (command, machine, wall time,
table, legend). Everything outside the markers is kept byte for byte, and
running it twice changes nothing. `--check` writes nothing and exits 1 if
the README is not up to date. Missing or repeated markers, or a results
file without its summary block, exit 2 with a message naming them.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from experiments import cli
from moejax.analysis.report import SUMMARY_BEGIN
from moejax.analysis.report import SUMMARY_END


EPILOG = """\
exit codes:
  0  done (with --check: the README is up to date)
  1  --check: the README is out of date (nothing written)
  2  a bad flag, a bad NAME=RESULTS pair, a missing or unreadable file, or
     missing or repeated markers: one line `error: ...` on stderr, nothing
     written"""


def markers(name: str) -> tuple[str, str]:
  """The README begin / end markers of table `name`."""
  return (f'<!-- baselines:{name}:begin -->', f'<!-- baselines:{name}:end -->')


def _span(text: str, begin: str, end: str, where: str) -> tuple[int, int]:
  """(index just after `begin`'s line, index of `end`) in text; ValueError
  unless each marker occurs exactly once, begin first."""
  for marker in (begin, end):
    count = text.count(marker)
    if count != 1:
      raise ValueError(f'{where} must contain the marker {marker!r} exactly '
                       f'once; found it {count} times.')
  start, stop = text.index(begin), text.index(end)
  if stop < start:
    raise ValueError(f'{where}: {end!r} comes before {begin!r}.')
  line_end = text.find('\n', start)
  start = len(text) if line_end < 0 else line_end + 1
  if start > stop:
    raise ValueError(f'{where}: {begin!r} and {end!r} must be on separate '
                     'lines.')
  return start, stop


def extract_summary(results_md: str, where: str = 'results.md') -> str:
  """The summary block of a results.md (between its markers, stripped).

  Args:
    results_md: the file's text.
    where: its name, for error messages.

  Returns:
    The block's text without the marker lines.
  """
  start, stop = _span(results_md, SUMMARY_BEGIN, SUMMARY_END, where)
  return results_md[start:stop].strip('\n')


def replace_table(readme: str, name: str, content: str,
                  where: str = 'README') -> str:
  """README text with the body between table `name`'s markers replaced.

  Args:
    readme: the README text.
    name: table name (see `markers`).
    content: the new body (no markers).
    where: the README's name, for error messages.

  Returns:
    The new README text: the marker lines stay, the body becomes
    `content` followed by one newline.
  """
  begin, end = markers(name)
  start, stop = _span(readme, begin, end, where)
  line_start = readme.rfind('\n', 0, stop) + 1
  if readme[line_start:stop].strip():
    raise ValueError(f'{where}: {end!r} must start its own line.')
  body = content.strip('\n') + '\n' if content.strip() else ''
  return readme[:start] + body + readme[line_start:]


def _parse_pairs(pairs: Sequence[str]) -> list[tuple[str, str]]:
  out = []
  for pair in pairs:
    name, eq, path = pair.partition('=')
    if not eq or not name or not path:
      raise ValueError(f'{pair!r} is not NAME=RESULTS_MD (e.g. '
                       'experts=runs/sweeps/x/results.md).')
    out.append((name, path))
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Rewrites the README tables; 0 ok, 1 out of date (--check), 2 error."""
  parser = cli.Parser(prog='python -m experiments.readme_table',
                      description=__doc__, epilog=EPILOG)
  parser.add_argument('readme', help='the README to rewrite')
  parser.add_argument('tables', nargs='+', help='NAME=path/to/results.md')
  parser.add_argument('--check', action='store_true',
                      help='write nothing; exit 1 if the README would change')
  args = parser.parse_args(argv)
  try:
    with open(args.readme, encoding='utf-8') as f:
      old = f.read()
    new = old
    for name, path in _parse_pairs(args.tables):
      with open(path, encoding='utf-8') as f:
        summary = extract_summary(f.read(), path)
      new = replace_table(new, name, summary, args.readme)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.check:
    print(f'{args.readme} is {"up to date" if new == old else "OUT OF DATE"}')
    return 0 if new == old else 1
  if new != old:
    with open(args.readme, 'w', encoding='utf-8') as f:
      f.write(new)
  print(f'{args.readme}: {"updated" if new != old else "unchanged"} '
        f'({", ".join(n for n, _ in _parse_pairs(args.tables))})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
