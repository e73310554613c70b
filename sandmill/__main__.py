"""`python -m sandmill` is the `sandmill` command."""

import sys

from sandmill.cli import main

sys.exit(main())
