"""``python -m rtsed.export``: the command line's module path; the command lives in rtsed.cli.export."""

import sys

from rtsed.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
