"""`python -m pipeline_diffews ...` (and `accelerate launch -m pipeline_diffews ...`) runs the `diffews` command line."""

import sys

from .cli import main

sys.exit(main())
