"""The kit that plugin authors (and vbfs's own tests) use: test disk images and a conformance check.

``vbfs.testing.images`` builds disk images with real partition tables and filesystems without mounting anything;
``vbfs.testing.conformance`` checks that a hypervisor plugin keeps the promises of :mod:`vbfs.sources`.
"""
