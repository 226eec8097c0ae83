"""``python -m vtl.testbed {cleanup,list}``."""

import sys

from vtl.testbed.netns import main

sys.exit(main())
