"""``python -m latentkv``: the command line, for interpreters whose scripts directory is not on PATH."""

import sys

from latentkv.cli import main

sys.exit(main())
