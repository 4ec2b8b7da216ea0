import sys

from ._rank_program import main

sys.exit(main())
