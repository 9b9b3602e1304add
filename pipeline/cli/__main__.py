"""`python3 -m pipeline.cli`: the embedded commands alone (no worker, submit, status)."""

import sys

from pipeline.cli import main

sys.exit(main())
