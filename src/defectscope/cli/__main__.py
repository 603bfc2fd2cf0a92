"""``python -m defectscope.cli``."""

import sys

from . import main

sys.exit(main())
