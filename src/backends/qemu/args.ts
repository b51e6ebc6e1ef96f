import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_NET } from '../../net/spec.js';
import { AGENT_PORT_NAME } from '../../protocol/constants.js';
import { driveSerial, ROOT_DRIVE_SERIAL } from '../drives.js';
import { SNAPSHOT_FILES, type NicSpec, type VmSpec } from '../types.js';

/** QEMU option values separate with commas; a comma inside a value is written twice. */
export function optionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

/**
 * Under TCG the guest's TSC runs at the host's rate, and microvm has no other clock to calibrate
 * it against: without this hint boot hangs about one time in eight.
 */
export function hostTscKhz(): number | undefined {
  try {
    const match = /^cpu MHz\s*:\s*([\d.]+)/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    return match ? Math.round(Number(match[1]) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

export function agentSocketPath(runDir: string): string {
  return join(runDir, 'agent.sock');
}

export function qmpSocketPath(runDir: string): string {
  return join(runDir, 'qmp.sock');
}

/** vhost-device-vsock's control socket, which QEMU connects to. */
export function vhostVsockSocketPath(runDir: string): string {
  return join(runDir, 'vhost-vsock.sock');
}

/** The hybrid vsock socket of a VM whose agent is on vsock. */
export function hybridVsockPath(runDir: string): string {
  return join(runDir, 'vsock.sock');
}

/** The sockets a QEMU VM leaves in its directory (cleared before another start in the same one). */
export function qemuSocketPaths(runDir: string): string[] {
  return [agentSocketPath(runDir), qmpSocketPath(runDir), vhostVsockSocketPath(runDir), hybridVsockPath(runDir)];
}

/** Root drives are raw images, except the qcow2 overlays this backend makes itself (createSnapshotDisk). */
export function rootDriveFormat(path: string): 'raw' | 'qcow2' {
  return path.endsWith('.qcow2') ? 'qcow2' : 'raw';
}

export interface QemuArgsOptions {
  tscKhz?: number;
  /** The agent is on vsock through vhost-device-vsock (its control socket: vhostVsockSocketPath). */
  vsock?: boolean;
  /** For a NIC with a proxy: the command QEMU runs per guest connection to the proxy address, its stdio being the connection. */
  proxyCommand?: readonly string[];
}

/**
 * QEMU user-mode networking (libslirp): the guest's packets become the host's own sockets, so no
 * root and no host configuration is needed. restrict=on drops everything the guest starts except
 * `guestfwd` connections (to the proxy); `hostfwd` forwards still reach the guest.
 */
export function nicArgs(nic: NicSpec, proxyCommand: readonly string[] | undefined): string[] {
  const netdev = ['user', 'id=net0', `net=${GUEST_NET.network}`, `restrict=${nic.restricted ? 'on' : 'off'}`];
  for (const forward of nic.forwards) netdev.push(`hostfwd=tcp:${forward.hostAddress}:${forward.hostPort}-${GUEST_NET.guest}:${forward.guestPort}`);
  if (nic.proxySocket) {
    if (!proxyCommand) throw new Error('nicArgs: a NIC with a proxy needs the command that reaches it');
    netdev.push(`guestfwd=tcp:${GUEST_NET.proxy.address}:${GUEST_NET.proxy.port}-cmd:${proxyCommand.map(shellQuote).join(' ')}`);
  }
  return ['-netdev', netdev.map(optionValue).join(','), '-device', `virtio-net-device,netdev=net0,mac=${GUEST_NET.mac}`];
}

/** One word for a POSIX shell, or for libslirp's command splitting (g_shell_parse_argv), which follows it. */
export function shellQuote(word: string): string {
  return `'${word.replaceAll("'", `'\\''`)}'`;
}

export function qemuArgs(spec: VmSpec, options: QemuArgsOptions = {}): string[] {
  const kvm = spec.accel === 'kvm';
  const snapshot = spec.snapshot;
  const memoryBackend = memoryBackendArg(spec, options);
  const kernelArgs = [
    'console=ttyS0',
    // The machine has no ACPI tables (acpi=off below); without this the kernel logs an error looking for them.
    'acpi=off',
    // With -no-reboot a guest reboot ends QEMU: the agent's power-off and a panic both stop the VM.
    'reboot=t',
    'panic=-1',
    ...(kvm ? [] : ['noapictimer', ...(options.tscKhz ? [`tsc_early_khz=${options.tscKhz}`] : [])]),
    options.vsock ? 'mvm.agent=vsock' : `mvm.agent=port:${AGENT_PORT_NAME}`,
    ...spec.kernelArgs,
  ];
  const args = [
    '-name', optionValue(spec.name),
    // acpi=off: with the minimal kernel, microvm's ACPI breaks interrupts.
    '-M', memoryBackend ? 'microvm,acpi=off,memory-backend=mem' : 'microvm,acpi=off',
    ...(memoryBackend ? ['-object', memoryBackend] : []),
    // The monitor: snapshots, and the watch for a guest the VMM stopped in an error state.
    '-qmp', `unix:${optionValue(qmpSocketPath(spec.runDir))},server=on,wait=off`,
    ...(snapshot?.mode === 'restore' ? ['-incoming', 'defer'] : []),
    ...(kvm ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg']),
    '-smp', String(spec.cpus),
    '-m', `${spec.memoryMiB}M`,
    '-nodefaults', '-no-user-config', '-no-reboot', '-display', 'none',
    '-chardev', 'stdio,id=console,signal=off',
    '-serial', 'chardev:console',
    '-kernel', spec.kernel,
    ...(spec.initrd ? ['-initrd', spec.initrd] : []),
    '-append', kernelArgs.join(' '),
    '-device', 'virtio-rng-device',
    ...(options.vsock
      ? [
          '-chardev', `socket,id=vhostvsock,path=${optionValue(vhostVsockSocketPath(spec.runDir))}`,
          '-device', 'vhost-user-vsock-device,chardev=vhostvsock',
        ]
      : [
          '-device', 'virtio-serial-device',
          '-chardev', `socket,id=agent,path=${optionValue(agentSocketPath(spec.runDir))},server=on,wait=off`,
          '-device', `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`,
        ]),
  ];
  if (spec.rootDrive) {
    args.push(
      '-drive',
      `file=${optionValue(spec.rootDrive.path)},format=${rootDriveFormat(spec.rootDrive.path)},if=none,id=rootdrive,snapshot=${spec.rootDrive.copyOnWrite ? 'on' : 'off'}`,
      '-device', `virtio-blk-device,drive=rootdrive,serial=${ROOT_DRIVE_SERIAL}`,
    );
  }
  if (spec.nic) args.push(...nicArgs(spec.nic, options.proxyCommand));
  spec.drives.forEach((drive, index) => {
    args.push(
      '-drive', `file=${optionValue(drive.path)},format=raw,if=none,id=drive${index},readonly=${drive.readOnly ? 'on' : 'off'}`,
      '-device', `virtio-blk-device,drive=drive${index},serial=${driveSerial(index)}`,
    );
  });
  return args;
}

/**
 * Guest RAM in a file for snapshots. share=on: the captured guest's RAM writes land in the file.
 * share=off: a private copy-on-write mapping (restore), so the file is never modified and any
 * number of VMs can map it. vhost-user devices need the RAM shared with their process (memfd).
 */
function memoryBackendArg(spec: VmSpec, options: QemuArgsOptions): string | undefined {
  if (spec.snapshot) {
    const ram = optionValue(join(spec.snapshot.dir, SNAPSHOT_FILES.memory));
    return `memory-backend-file,id=mem,mem-path=${ram},size=${spec.memoryMiB}M,share=${spec.snapshot.mode === 'capture' ? 'on' : 'off'}`;
  }
  return options.vsock ? `memory-backend-memfd,id=mem,size=${spec.memoryMiB}M,share=on` : undefined;
}
