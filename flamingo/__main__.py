"""`python -m flamingo ARGS`: the `flamingo` command (flamingo/cli.py), where its console script is not on PATH."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process re-imports the main module
    sys.exit(main())
