"""`python -m mqi_communicator.intake`: the intake rule's command (see case.py)."""

import sys

from mqi_communicator.intake.case import main

if __name__ == "__main__":
    sys.exit(main())
