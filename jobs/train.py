"""Ray job entry point: `ray job submit --working-dir . -- python jobs/train.py ...`.

Same flags as `detector train` (see `detector train --help`); this file only forwards them.
"""

import sys

from detector.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], owns_process=True))
