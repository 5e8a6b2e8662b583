"""`python -m attnpipe.cli`: the same command line as `attnpipe`."""

import os
import sys

from attnpipe.cli import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.exit(main())
