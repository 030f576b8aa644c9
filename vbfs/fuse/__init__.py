"""The FUSE adapter: serves the tree of :mod:`vbfs.vfs` read-only through pyfuse3 on trio."""
