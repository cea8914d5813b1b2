"""`python -m domainlm ...` (also what `torchrun -m domainlm train ...` runs)."""

import sys

from domainlm.cli import main

sys.exit(main())
