"""Shared checks of the command lines' user-error contract."""

import pytest


def assert_bad_flag(capsys, main, argv, flag, allowed):
  """main(argv) exits 2 with one stderr line, `error: ... (see --help)`,
  naming `flag` and `allowed`, and prints nothing on stdout."""
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith('error: ') and lines[0].endswith('(see --help)')
  assert flag in lines[0] and allowed in lines[0], lines[0]
