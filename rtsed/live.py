"""``python -m rtsed.live``: the command line's module path; the command lives in rtsed.cli.live."""

import sys

from rtsed.cli.live import main

if __name__ == "__main__":
    sys.exit(main())
