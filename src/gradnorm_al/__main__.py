"""``python -m gradnorm_al``: the ``gradnorm-al`` command."""

import sys

from .cli import main

sys.exit(main())
