"""``python -m rtsed.worker``: the command line's module path; the command lives in rtsed.cli.worker."""

import sys

from rtsed.cli.worker import main

if __name__ == "__main__":
    sys.exit(main())
