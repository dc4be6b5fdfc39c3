"""``python -m converters``: the ``latentkv`` command line, for interpreters whose scripts directory is not on PATH."""

import sys

from converters.cli import main

sys.exit(main())
