"""Ray job entry point: `ray job submit --working-dir . -- python jobs/scan.py ...`.

Same flags as `detector scan` (see `detector scan --help`); this file only forwards them.
"""

import sys

from detector.cli import main

if __name__ == "__main__":
    sys.exit(main(["scan", *sys.argv[1:]], owns_process=True))
