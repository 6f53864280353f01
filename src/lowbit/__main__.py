"""``python -m lowbit``: the same as the ``lowbit`` command."""

import sys

from lowbit.cli import main

sys.exit(main())
