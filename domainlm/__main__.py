"""`python -m domainlm ...` (also what `torchrun -m domainlm train ...` runs)."""

import sys

from domainlm.entry import main

sys.exit(main())
