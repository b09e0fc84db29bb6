"""Deprecated: moved to :mod:`evals.firing.fire_rate` (``neuraldb fire-rate``); this forwards to its ``main``."""

import sys
import warnings

from evals.firing.fire_rate import main as _main


def main(argv=None) -> int:
    warnings.warn("python -m properties.fire_rate is deprecated: use "
                  "`neuraldb fire-rate` (or python -m evals.firing.fire_rate)",
                  FutureWarning, stacklevel=2)
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
