"""``python -m puma``: the ``puma`` command (:func:`puma.cli.main`)."""

import sys

from puma.cli import main

if __name__ == "__main__":
    sys.exit(main())
