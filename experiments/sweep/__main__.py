"""`python -m experiments.sweep`: see the package docstring."""

import sys

from experiments.sweep.cli import main

if __name__ == '__main__':
  sys.exit(main())
