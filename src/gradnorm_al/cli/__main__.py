"""``python -m gradnorm_al.cli``: the ``gradnorm-al`` command."""

import sys

from . import main

sys.exit(main())
