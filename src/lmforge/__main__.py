"""`python -m lmforge ...` is the `lmforge` command (torchrun needs a module or a script)."""

import sys

from lmforge.cli import main

sys.exit(main())
