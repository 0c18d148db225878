"""``python -m smtpstate``: see :mod:`smtpstate.cli`."""

import sys

from smtpstate.cli import main

sys.exit(main())
