"""``python -m compress`` is ``python -m compress.run``."""

import sys

from compress.run import main

sys.exit(main())
