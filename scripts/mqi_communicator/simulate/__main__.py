"""`python -m mqi_communicator.simulate`: the simulate rule's command (see runner.py)."""

import sys

from mqi_communicator.simulate.runner import main

if __name__ == "__main__":
    sys.exit(main())
