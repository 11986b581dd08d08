"""`python -m mqi_communicator.rtdose`: the rtdose rule's command (see writer.py)."""

import sys

from mqi_communicator.rtdose.writer import main

if __name__ == "__main__":
    sys.exit(main())
