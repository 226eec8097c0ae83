"""``python -m vtl`` runs the CLI."""

import sys

from vtl.cli.main import main

sys.exit(main())
