"""`python -m bench SUITE [options]`: run a benchmark suite and print its table (bench.suites)."""

import sys

from bench.suites import main

sys.exit(main())
