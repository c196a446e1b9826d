"""Ray job entry point: `ray job submit --working-dir . -- python jobs/prepare.py ...`.

Same flags as `detector prepare` (see `detector prepare --help`); this file only forwards them.
"""

import sys

from detector.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]], owns_process=True))
