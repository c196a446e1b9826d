"""Ray job entry point: `ray job submit --working-dir . -- python jobs/sample.py ...`.

Same flags as `detector sample` (see `detector sample --help`); this file only forwards them.
"""

import sys

from detector.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]], owns_process=True))
