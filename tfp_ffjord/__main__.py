"""`python -m tfp_ffjord ...` is the `tfp-ffjord` command line."""

import sys

from tfp_ffjord.cli import main

sys.exit(main())
