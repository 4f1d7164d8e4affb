"""LoRA on the expert-parallel path: runs lora_checks.py with 8 fake CPU
devices (tests/sharding/fake_devices.py)."""

import os

from tests.sharding import fake_devices

CHECKS = [os.path.join('tests', 'sharding', 'lora_checks.py')]
NUM_CHECKS = 3  # one per mesh


def test_lora_on_8_devices_matches_one_device():
  fake_devices.run_checks(CHECKS, NUM_CHECKS)
