"""Test infrastructure: throwaway servers (sshd, SLURM) and their pytest fixtures."""
