"""`python3 -m workers.cli`: the whole `layerwarm` command, as its entry point runs it."""

import sys

from workers.cli import main

sys.exit(main())
