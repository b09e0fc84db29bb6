"""Deprecated: moved to :mod:`evals.firing.gate_variants` (``neuraldb gate-variants``); this forwards to its ``main``."""

import sys
import warnings

from evals.firing.gate_variants import main as _main


def main(argv=None) -> int:
    warnings.warn("python -m properties.study is deprecated: use "
                  "`neuraldb gate-variants` (or python -m evals.firing.gate_variants)",
                  FutureWarning, stacklevel=2)
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
