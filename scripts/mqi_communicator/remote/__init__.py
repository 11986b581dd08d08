"""The remote deployment: SSH to the cluster (connection, commands, upload and its tar stream, download, hashing) and SLURM over it (job script, client, record, one beam); CLIs `stage`, `job`, `transfer`."""

import sys

# paramiko imports `invoke` when it is installed, only for ssh_config's "Match exec", which this
# package never reads (it takes no ssh_config). That import (asyncio, unittest.mock, yaml, ...)
# was ~25 % of every remote CLI's start-up; marking it absent makes paramiko skip it. A process
# that imported invoke already keeps it.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
