"""Runs check modules under 8 fake CPU devices, in a pytest subprocess
(the devices must exist before JAX starts)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def run_checks(checks, num_checks: int, timeout_s: int = 600) -> None:
  """Runs pytest on `checks` (paths from the repository root) with 8 fake
  devices; asserts it passed exactly `num_checks` tests, none skipped.

  PJRT_NPROC=16 gives the collectives enough CPU threads not to deadlock;
  `timeout -s KILL` ends a hung collective (JAX traps SIGTERM).
  """
  flags = ('--xla_force_host_platform_device_count=8 '
           '--xla_backend_optimization_level=0')  # half the compile time
  # Drop pytest(-xdist) worker variables: the child is a pytest of its own.
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}
  env.update(XLA_FLAGS=flags, PJRT_NPROC='16', JAX_PLATFORMS='cpu')
  cmd = ['timeout', '-s', 'KILL', str(timeout_s), sys.executable, '-m',
         'pytest', '-q', '-p', 'no:cacheprovider', '-rs', *checks]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  # The summary line ("N passed in ..."); plugins may print warnings after
  # it, on stderr.
  summary = [line for line in proc.stdout.splitlines()
             if re.search(r'\d+ (passed|failed)', line)][-1:] or ['']
  assert re.search(rf'\b{num_checks} passed\b', summary[0]), out[-3000:]
  assert 'skipped' not in summary[0] and 'error' not in summary[0], (
      out[-3000:])
