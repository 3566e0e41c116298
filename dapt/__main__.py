"""`python -m dapt`: the `dapt` command."""

import sys

from dapt.launch.cli import main

sys.exit(main())
