"""cocon: run any workload at the isolation level it needs, from one OCI image."""

__version__ = "0.1.0"
