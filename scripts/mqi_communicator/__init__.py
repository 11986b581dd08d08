"""mqi_communicator: the logic behind the Snakemake workflow, one module per concern.

Each module that a rule calls has a CLI (`python -m mqi_communicator.<module> --help`) so it
can replace, or be replaced by, the clinic's external tool for the same step.
"""

__version__ = "0.1.0"
