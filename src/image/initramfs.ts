/**
 * The default guest's root file system: a newc cpio initramfs holding a static busybox (init and
 * every applet), a tiny init configuration and the mvm guest agent, which busybox init starts and
 * ends the VM when it ends. No root privileges are needed to build it (see cpio.ts).
 */
import { readFile } from 'node:fs/promises';
import { gzipSync } from 'node:zlib';

import { MvmError } from '../errors.js';
import { lastLine, runTool } from '../run-tool.js';
import { type CpioEntry, normalizeCpioPath, writeCpio } from './cpio.js';

/** Bump whenever the layout or the init scripts change: it is part of the image manifest. */
export const INITRAMFS_LAYOUT_VERSION = 4;

/** Where things live inside the guest. */
export const GUEST_INIT_PATH = '/sbin/init';
export const GUEST_AGENT_PATH = '/sbin/mvm-agent';
export const GUEST_BUSYBOX_PATH = '/bin/busybox';
export const GUEST_HOSTNAME = 'mvm';

/** Applets the image promises (the agent, the tests and users rely on them). */
export const REQUIRED_APPLETS: readonly string[] = [
  'sh', 'mount', 'umount', 'mkdir', 'cat', 'echo', 'ls', 'env', 'uname', 'sleep', 'true', 'false',
  'printf', 'head', 'tr', 'sha256sum', 'kill', 'ps', 'pwd', 'init', 'reboot', 'poweroff', 'grep',
  'sed', 'dd', 'sync', 'seq', 'wc', 'id', 'hostname', 'ln',
];

/**
 * busybox init (PID 1) starts the agent once, and an agent that dies takes the VM down with it: a
 * respawned agent would know nothing of the session, and the host would wait on a command that
 * has already ended. The VMM's exit then tells the host at once (exit 125). There is no rc script:
 * the agent mounts /proc, /sys, /dev, /tmp, /run and sets the hostname itself at start
 * (guest/setup.c, guest_setup), in system calls rather than one emulated process per step.
 */
export const INITTAB = `# busybox init: start the mvm guest agent, which sets up the early mounts itself; when it ends, so does the VM.
::once:/bin/busybox sh -c '${GUEST_AGENT_PATH}; exec /bin/busybox reboot -f'
::ctrlaltdel:/bin/busybox reboot -f
::shutdown:/bin/busybox sync
`;

export const PASSWD = `root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
`;

export const GROUP = `root:x:0:
tty:x:5:
nogroup:x:65534:
`;

export const HOSTS = `127.0.0.1\tlocalhost ${GUEST_HOSTNAME}
`;

export interface InitramfsInputs {
  /** Contents of the static busybox binary. */
  busybox: Uint8Array;
  /** Applet install paths as printed by `busybox --list-full` (e.g. `usr/bin/head`). */
  applets: readonly string[];
  /** Contents of the static guest agent binary. */
  agent: Uint8Array;
}

/** The archive's entries (pure: no file system access), sorted when written. */
export function initramfsEntries(inputs: InitramfsInputs): CpioEntry[] {
  const names = new Set(inputs.applets.map((p) => p.split('/').pop()!));
  const missing = REQUIRED_APPLETS.filter((a) => !names.has(a));
  if (missing.length > 0) {
    throw new MvmError(`the busybox used for the guest image lacks applets: ${missing.join(', ')} (install the Debian package busybox-static)`);
  }

  const entries = new Map<string, CpioEntry>();
  const add = (entry: CpioEntry): void => {
    entries.set(normalizeCpioPath(entry.path), entry);
  };
  const dirs: Array<[string, number]> = [
    ['bin', 0o755], ['sbin', 0o755], ['usr', 0o755], ['usr/bin', 0o755], ['usr/sbin', 0o755],
    ['usr/local', 0o755], ['usr/local/bin', 0o755], ['usr/local/sbin', 0o755],
    ['etc', 0o755], ['dev', 0o755], ['proc', 0o555], ['sys', 0o555],
    ['tmp', 0o1777], ['run', 0o755], ['root', 0o700], ['mnt', 0o755], ['var', 0o755], ['home', 0o755],
  ];
  for (const [path, mode] of dirs) add({ type: 'dir', path, mode });

  // Applet links first, so that our own files below win where a path is both.
  const busyboxRel = normalizeCpioPath(GUEST_BUSYBOX_PATH);
  for (const raw of inputs.applets) {
    const path = normalizeCpioPath(raw);
    if (path === busyboxRel) continue;
    add({ type: 'symlink', path, target: GUEST_BUSYBOX_PATH });
  }
  add({ type: 'file', path: busyboxRel, data: inputs.busybox, mode: 0o755 });
  add({ type: 'symlink', path: GUEST_INIT_PATH, target: GUEST_BUSYBOX_PATH });
  add({ type: 'symlink', path: 'init', target: GUEST_INIT_PATH }); // the kernel's default rdinit
  add({ type: 'symlink', path: 'var/run', target: '/run' });
  add({ type: 'symlink', path: 'var/tmp', target: '/tmp' });
  // The kernel writes the resolver of a guest with a NIC (its `ip=` argument) here, in resolv.conf's format.
  add({ type: 'symlink', path: 'etc/resolv.conf', target: '/proc/net/pnp' });
  add({ type: 'file', path: GUEST_AGENT_PATH, data: inputs.agent, mode: 0o755 });
  add({ type: 'file', path: 'etc/inittab', data: Buffer.from(INITTAB), mode: 0o644 });
  add({ type: 'file', path: 'etc/passwd', data: Buffer.from(PASSWD), mode: 0o644 });
  add({ type: 'file', path: 'etc/group', data: Buffer.from(GROUP), mode: 0o644 });
  add({ type: 'file', path: 'etc/hostname', data: Buffer.from(GUEST_HOSTNAME + '\n'), mode: 0o644 });
  add({ type: 'file', path: 'etc/hosts', data: Buffer.from(HOSTS), mode: 0o644 });
  // The kernel opens /dev/console for init before anything is mounted: it must be in the archive.
  add({ type: 'char', path: 'dev/console', major: 5, minor: 1, mode: 0o600 });
  add({ type: 'char', path: 'dev/null', major: 1, minor: 3, mode: 0o666 });

  // Every parent directory must be listed before its contents.
  for (const path of [...entries.keys()]) {
    const parts = path.split('/');
    for (let i = 1; i < parts.length; i++) {
      const dir = parts.slice(0, i).join('/');
      const existing = entries.get(dir);
      if (!existing) add({ type: 'dir', path: dir, mode: 0o755 });
      else if (existing.type !== 'dir') throw new Error(`initramfs: ${dir} is needed as a directory but is a ${existing.type}`);
    }
  }
  return [...entries.values()];
}

export type InitramfsCompression = 'none' | 'gzip';

/** The archive bytes for `inputs`, optionally gzip-compressed (the kernel has RD_GZIP). */
export function buildInitramfs(inputs: InitramfsInputs, compression: InitramfsCompression = 'none'): Buffer {
  const archive = writeCpio(initramfsEntries(inputs));
  return compression === 'gzip' ? gzipSync(archive, { level: 9 }) : archive;
}

/** Applet install paths of a busybox binary (`busybox --list-full`), sorted. */
export async function listBusyboxApplets(busyboxPath: string): Promise<string[]> {
  const result = await runTool(busyboxPath, ['--list-full'], { timeoutMs: 10_000 }).catch((err: Error) => ({ code: -1, stdout: '', stderr: err.message }));
  if (result.code !== 0) {
    throw new MvmError(`cannot list the applets of ${busyboxPath}: ${lastLine(result.stderr)} (install the Debian package busybox-static)`);
  }
  return result.stdout.split('\n').map((l) => l.trim()).filter((l) => l.length > 0).sort();
}

/** Reads busybox and the agent from the host and builds the archive. */
export async function buildInitramfsFromFiles(options: {
  busyboxPath: string;
  agentPath: string;
  compression?: InitramfsCompression;
}): Promise<Buffer> {
  const [busybox, agent, applets] = await Promise.all([
    readFile(options.busyboxPath),
    readFile(options.agentPath),
    listBusyboxApplets(options.busyboxPath),
  ]);
  return buildInitramfs({ busybox, agent, applets }, options.compression);
}
