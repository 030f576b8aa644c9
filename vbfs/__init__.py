"""vbfs: agentless backups of virtual machines into one deduplicated, mountable repository."""

__version__ = "0.1.0"
