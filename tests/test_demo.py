"""experiments.demo in-process: a default run, its --help, its bad flags.

The default run is E=8, K=2, cf=1.0 on x [B=4, L=64, D=32] in one group of
S=64 tokens, so C = cf * S * K / E = 1.0 * 64 * 2 / 8 = 16 slots.
"""

import pytest

from experiments import demo
from tests.cli_helpers import assert_bad_flag


def test_runs_with_defaults(capsys):
  assert demo.main([]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == ('MoeLayer E=8 K=2 cf=1.0 priority=choice: '
                    'x (4, 64, 32) -> y (4, 64, 32)')
  assert out[1] == '  capacity C = 16 slots per expert per group (S = 64)'
  names = [line.split()[0] for line in out[3:-1]]
  assert names == list(demo.AUX_METRICS)
  diff = float(out[-1].rsplit('=', 1)[1])
  assert out[-1].startswith('  gather vs einsum max |diff| =') and diff < 1e-5


def test_flags_reach_the_layer(capsys):
  assert demo.main(['--num_experts', '4', '--top_k=1', '--capacity_factor',
                    '2', '--priority', 'token']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith('MoeLayer E=4 K=1 cf=2.0 priority=token:')
  assert out[1].startswith('  capacity C = 32 ')  # 2.0 * 64 * 1 / 4


def test_top_k_may_equal_num_experts():
  args = demo.parse_args(['--num_experts', '3', '--top_k', '3'])
  assert (args.num_experts, args.top_k) == (3, 3)


def test_help_says_what_and_exit_codes(capsys):
  with pytest.raises(SystemExit) as exit_info:
    demo.main(['--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert 'Routes one random batch through an MoeLayer' in out
  assert 'exit codes:' in out and '2  a bad flag' in out


@pytest.mark.parametrize('argv, flag, allowed', [
    (['--top_k', '9'], '--top_k', 'an int in [1, 8]'),
    (['--num_experts', '4', '--top_k', '5'], '--top_k', 'an int in [1, 4]'),
    (['--num_experts', 'x'], '--num_experts', 'an int >= 1'),
    (['--top_k', '0'], '--top_k', 'an int >= 1'),
    (['--capacity_factor', '0'], '--capacity_factor', 'a number > 0'),
    (['--capacity_factor', 'inf'], '--capacity_factor', 'a number > 0'),
    (['--priority', 'random'], '--priority', "'choice', 'token', 'score'"),
    (['--dispatcher', 'gather'], '--dispatcher', 'unrecognized arguments'),
])
def test_bad_flag_is_one_line_and_exit_2(capsys, argv, flag, allowed):
  assert_bad_flag(capsys, demo.main, argv, flag, allowed)
