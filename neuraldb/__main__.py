"""``python -m neuraldb ...`` (and ``torchrun ... -m neuraldb edit ...``): the command line, :mod:`neuraldb.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
