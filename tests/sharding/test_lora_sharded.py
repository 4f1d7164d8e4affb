"""LoRA on the expert-parallel path: runs lora_checks.py in a subprocess
with 8 fake CPU devices (they must exist before JAX starts)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
CHECKS = os.path.join('tests', 'sharding', 'lora_checks.py')
NUM_CHECKS = 3  # one per mesh


def test_lora_on_8_devices_matches_one_device():
  flags = ('--xla_force_host_platform_device_count=8 '
           '--xla_backend_optimization_level=0')  # half the compile time
  # Drop pytest(-xdist) worker variables: the child is a pytest of its own.
  env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}
  # PJRT_NPROC=16: enough CPU threads that collectives cannot deadlock.
  env.update(XLA_FLAGS=flags, PJRT_NPROC='16', JAX_PLATFORMS='cpu')
  # timeout -s KILL: JAX traps SIGTERM; a hung collective must not hang CI.
  cmd = ['timeout', '-s', 'KILL', '600', sys.executable, '-m', 'pytest',
         '-q', '-p', 'no:cacheprovider', '-rs', CHECKS]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  summary = [line for line in proc.stdout.splitlines()
             if re.search(r'\d+ (passed|failed)', line)][-1:] or ['']
  assert re.search(rf'\b{NUM_CHECKS} passed\b', summary[0]), out[-3000:]
  assert 'skipped' not in summary[0], out[-3000:]
