"""Guest volumes and filesystems, read in user space from a snapshot's chunks.

``volumes.discover`` finds what a disk holds — partitions of an MBR or GPT table, LVM2 logical volumes inside
them, or one filesystem on the whole disk — and ``filesystems.open_filesystem`` opens ext2/3/4, XFS, FAT12/16/32,
NTFS or Btrfs on a volume through dissect's parsers. Nothing here touches the host kernel: an untrusted guest
filesystem is parsed by Python code, and a damaged one raises :class:`GuestDataError`, never worse.

Thread-safety: a :class:`GuestFS` serialises the calls into its parser with its own lock; different filesystems
(and different snapshots) are read in parallel. Every call into a parser is bounded in time and memory
(:mod:`vbfs.guestfs.bounds`): a damaged or hostile filesystem costs an error for what it damaged, never a hang.
"""

from vbfs.guestfs.model import GuestDataError, GuestEntry, GuestFS, VolumeBusy

__all__ = ["GuestDataError", "GuestEntry", "GuestFS", "VolumeBusy"]
