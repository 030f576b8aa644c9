"""A tiny bootable Linux guest with the QEMU guest agent, for tests that need a real agent to freeze and thaw.

``python -m vbfs.testing.guest DEST`` (run by tools/setup) takes Debian's cloud kernel and busybox-static
(``apt-get download``, unpacked with ``dpkg-deb -x``, nothing installed on the host) and the host's ``qemu-ga``
with its libraries, and writes ``DEST/vmlinuz`` and ``DEST/initrd.gz``. The guest's init loads the virtio
modules, mounts the first partition of ``vda`` (ext4) on /mnt, and runs ``qemu-ga`` on the
``org.qemu.guest_agent.0`` virtio-serial port, so ``guest-fsfreeze-freeze`` really freezes that filesystem.
Boot it with ``vbfs.testing.libvirtd.domain_xml(..., agent=True, boot=(kernel, initrd, console_log))``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = [  # the guest's init loads them until all are in
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/virtio_console.ko",
]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for round in 1 2 3; do  # in whatever order their symbols allow
    for m in {modules}; do insmod /lib/vbfs-modules/$m 2>/dev/null; done
done
i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /mnt /var/run
mount -t ext4 /dev/vda1 /mnt && echo "vbfs-guest: /dev/vda1 mounted on /mnt" >/dev/console
port=""
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename "$p")
done
echo "vbfs-guest: agent port ${{port:-none}}" >/dev/console
while true; do
    /usr/sbin/qemu-ga -m virtio-serial -p "$port" -f /var/run/qemu-ga.pid
    sleep 1
done
"""


def _cpio_newc(root: Path) -> bytes:
    """The files below ``root`` as a newc cpio archive (the initramfs format)."""
    out = bytearray()
    ino = 1

    def entry(name: str, mode: int, data: bytes, nlink: int = 1) -> None:
        nonlocal ino
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        ino += 1
        out.extend(header.encode() + encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            entry(rel, st.st_mode, os.readlink(path).encode())
        elif path.is_dir():
            entry(rel, st.st_mode, b"", 2)
        else:
            entry(rel, st.st_mode, path.read_bytes())
    entry("TRAILER!!!", 0, b"")
    return bytes(out)


def _libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
            libs.append(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def build(dest: Path) -> tuple[Path, Path]:
    kernel, initrd = dest / "vmlinuz", dest / "initrd.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    qga = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"
    if not Path(qga).exists():
        raise SystemExit("qemu-ga is not installed (apt-get install qemu-guest-agent)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vbfs-guest-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # apt-get download runs as _apt
        deps = subprocess.run(
            ["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True, check=True
        ).stdout
        image = next(w for line in deps.splitlines() for w in line.split() if w.startswith("linux-image-6"))
        subprocess.run(["apt-get", "download", "-q", image, "busybox-static"], cwd=work, check=True)
        for deb in work.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
        x = work / "x"
        root = work / "root"
        for d in ("bin", "dev", "proc", "sys", "mnt", "lib/vbfs-modules", "usr/sbin", "var/run"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(x / "bin" / "busybox", root / "bin" / "busybox")
        modules_root = next((x / "lib" / "modules").iterdir()) / "kernel"
        names = []
        for m in MODULES:
            shutil.copy2(modules_root / m, root / "lib" / "vbfs-modules" / Path(m).name)
            names.append(Path(m).name)
        shutil.copy2(qga, root / "usr" / "sbin" / "qemu-ga")
        for lib in _libraries(qga):
            target = root / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), target)
        init = root / "init"
        init.write_text(INIT.format(modules=" ".join(names)))
        init.chmod(0o755)
        shutil.copy2(next((x / "boot").glob("vmlinuz-*")), kernel)
        with gzip.open(initrd, "wb", compresslevel=6) as f:
            f.write(_cpio_newc(root))
    return kernel, initrd


if __name__ == "__main__":
    k, i = build(Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/guest"))
    print(f"{k} {i}")
