#!/bin/sh
# A remote testbed host on this machine, for a pool whose libvirt URI is
# qemu+ssh://: libvirtd, virtlogd and sshd in a network namespace, a PID
# namespace and a mount namespace of their own. This script is pid 1 of
# the PID namespace (started by `unshare --mount --pid --fork --kill-child
# --mount-proc` inside the network namespace): when the test kills unshare,
# everything here dies, guests' QEMUs included.
#
# Nothing the testbed keeps is on the control plane's paths: /run, libvirt's
# state, logs and config are tmpfs here, its ptys are a devpts instance of
# its own (the control plane's /dev/pts/N is another pty), and the image
# directory DIR/image, empty for everyone else, shows DIR/image-private
# here; and the control plane's own directory (CLUSTER) is an empty tmpfs
# here. So a control plane that made a disk, read a console log or opened
# a pty on its own machine would find nothing, and the testbed nothing it
# made: it must go through libvirt.
#
# Usage: remote-testbed.sh DIR CLUSTER
#   DIR: sshd_config, host keys, image-private; CLUSTER: the test's cluster
#   directory (the control plane's data directory is under it)
set -eu
dir=$1 cluster=$2
mount --make-rprivate /
mount -t tmpfs tmpfs "$cluster"
cp /etc/libvirt/qemu.conf "$dir/qemu.conf"
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd /run/libvirt /run/lock
for d in /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /etc/libvirt; do
  mkdir -p "$d"
  mount -t tmpfs tmpfs "$d"
done
cp "$dir/qemu.conf" /etc/libvirt/qemu.conf
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
mount --bind /dev/pts/ptmx /dev/ptmx
mount --bind "$dir/image-private" "$dir/image"
virtlogd -d
libvirtd -d
exec /usr/sbin/sshd -D -e -f "$dir/sshd_config"
