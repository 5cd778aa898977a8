"""``python -m rtsed.serve``: the command line's module path; the command lives in rtsed.cli.serve."""

import sys

from rtsed.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
