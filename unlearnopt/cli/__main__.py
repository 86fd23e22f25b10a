"""``python -m unlearnopt.cli``: the ``unlearnopt`` command."""

import sys

from unlearnopt.cli import main

sys.exit(main())
