"""The remote deployment: SSH to the cluster (connection, commands, upload, download, hashing) and SLURM over it (job script, client, record, one beam); CLIs `stage`, `job`, `transfer`."""
