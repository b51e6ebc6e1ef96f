/**
 * The first stage of a template with its own root file system: the default image's initramfs
 * (busybox, the agent) with a different init configuration. busybox init stays PID 1 and supervises
 * the agent as in the default image, but the agent runs chrooted into the template's root drive, so
 * every command sees the user's file system as `/`:
 *
 *   1. mvm-root mounts /proc, /sys and /dev in the initramfs, finds the drive whose virtio serial
 *      is `mvmroot`, mounts it (ext4) on /newroot, mounts
 *      proc, sysfs, /dev (rbind), tmpfs /tmp and /run inside, and puts the agent on a read-only tmpfs
 *      at /newroot/.mvm (the reserved path).
 *   2. init runs `chroot /newroot /.mvm/mvm-agent` once, and reboots (ends the VM) when it ends.
 *
 * Nothing of ours is written into the user's files: /.mvm and any missing mount points are added to
 * the ext4 image when it is built, and the agent only ever lives in memory.
 */
import { readFile } from 'node:fs/promises';
import { ROOT_DRIVE_SERIAL } from '../backends/drives.js';
import { writeCpio } from '../image/cpio.js';
import { GUEST_AGENT_PATH, initramfsEntries, listBusyboxApplets } from '../image/initramfs.js';

/** Reserved directory in a template's root file system (mvmctl's agent is mounted there). */
export const RESERVED_DIR = '.mvm';
/** Mount points mvmctl needs in the root file system; created in the image when the user's tree lacks them. */
export const MOUNT_POINTS: readonly string[] = ['proc', 'sys', 'dev', 'tmp', 'run', RESERVED_DIR];
/** Bump when the scripts below or the image layout change (part of the template metadata). */
export const TEMPLATE_LAYOUT_VERSION = 4;

export const TEMPLATE_INITTAB = `# mvm template boot: busybox init (PID 1, in the initramfs) supervises the agent chrooted into the root drive.
::sysinit:/etc/init.d/mvm-root
::once:/bin/busybox sh -c '/bin/busybox chroot /newroot /${RESERVED_DIR}/mvm-agent; exec /bin/busybox reboot -f'
::ctrlaltdel:/bin/busybox reboot -f
::shutdown:/bin/busybox sync
`;

export const MVM_ROOT_SCRIPT = `#!/bin/sh
# mvm template boot, stage 2: mount the root drive (virtio serial ${ROOT_DRIVE_SERIAL}) and prepare it for the agent.
fail() { echo "mvm-root: $*" > /dev/console; sync; reboot -f; sleep 60; }
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
dev=
for d in /sys/block/*; do
  [ "$(cat "$d/serial" 2>/dev/null)" = ${ROOT_DRIVE_SERIAL} ] && dev=/dev/\${d##*/}
done
[ -n "$dev" ] || fail "no root drive (virtio serial ${ROOT_DRIVE_SERIAL})"
mkdir -p /newroot
mount -t ext4 -o rw,noatime "$dev" /newroot || fail "cannot mount the root drive $dev"
for m in ${MOUNT_POINTS.join(' ')}; do
  [ -d "/newroot/$m" ] || mkdir -p "/newroot/$m" || fail "the root file system has no /$m"
done
mount -t proc -o nosuid,nodev,noexec proc /newroot/proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /newroot/sys
mount -o rbind /dev /newroot/dev
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run
mount -t tmpfs -o nosuid,nodev,mode=0755,size=8m tmpfs /newroot/${RESERVED_DIR}
cp ${GUEST_AGENT_PATH} /newroot/${RESERVED_DIR}/mvm-agent || fail "cannot install the agent"
mount -o remount,ro /newroot/${RESERVED_DIR}
# A guest with a NIC and a resolver (the kernel's ip= argument) gets it as its resolv.conf, over the
# template's own file, only in memory; a link or a missing file is left alone.
if grep -q '^nameserver' /proc/net/pnp 2>/dev/null && [ -f /newroot/etc/resolv.conf ] && [ ! -L /newroot/etc/resolv.conf ]; then
  mount -o bind,ro /proc/net/pnp /newroot/etc/resolv.conf
fi
`;

export async function buildTemplateInitramfs(busyboxPath: string, agentPath: string): Promise<Buffer> {
  const [busybox, agent, applets] = await Promise.all([readFile(busyboxPath), readFile(agentPath), listBusyboxApplets(busyboxPath)]);
  const entries = initramfsEntries({ busybox, agent, applets }).filter((e) => e.path !== 'etc/inittab');
  entries.push(
    { type: 'dir', path: 'etc/init.d', mode: 0o755 },
    { type: 'file', path: 'etc/inittab', data: Buffer.from(TEMPLATE_INITTAB), mode: 0o644 },
    { type: 'file', path: 'etc/init.d/mvm-root', data: Buffer.from(MVM_ROOT_SCRIPT), mode: 0o755 },
    { type: 'dir', path: 'newroot', mode: 0o755 },
  );
  return writeCpio(entries);
}
