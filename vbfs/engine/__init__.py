"""Backup runs, restore and check: the work between sources and the store."""
