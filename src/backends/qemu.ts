import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { MvmError } from '../errors.js';
import { findExecutable } from './which.js';
import { ConsoleBuffer } from './console.js';
import type { Backend, BackendCapabilities, RunningVm, VmExit, VmSpec } from './types.js';

/** Name of the virtio-serial port the guest agent listens on (docs/protocol.md, transports). */
export const AGENT_PORT_NAME = 'org.mvm.agent';

function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * Under TCG the guest's TSC runs at the host's rate, and microvm has no other clock to calibrate
 * it against: without this hint boot hangs about one time in eight (shared notes, pitfall 1).
 */
export function hostTscKhz(): number | undefined {
  try {
    const match = /^cpu MHz\s*:\s*([\d.]+)/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    return match ? Math.round(Number(match[1]) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

export function qemuArgs(spec: VmSpec, options: { kvm: boolean; tscKhz?: number }): string[] {
  const kernelArgs = [
    'console=ttyS0',
    // The machine has no ACPI tables (acpi=off below); without this the kernel logs an error looking for them.
    'acpi=off',
    // With -no-reboot a guest reboot ends QEMU: the agent's power-off and a panic both stop the VM.
    'reboot=t',
    'panic=-1',
    ...(options.kvm ? [] : ['noapictimer', ...(options.tscKhz ? [`tsc_early_khz=${options.tscKhz}`] : [])]),
    `mvm.agent=port:${AGENT_PORT_NAME}`,
    ...spec.kernelArgs,
  ];
  const args = [
    '-name', spec.name,
    // acpi=off: with the minimal kernel, microvm's ACPI breaks interrupts (shared notes, pitfall 3).
    '-M', 'microvm,acpi=off',
    ...(options.kvm ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg']),
    '-smp', String(spec.cpus),
    '-m', `${spec.memoryMiB}M`,
    '-nodefaults', '-no-user-config', '-no-reboot', '-display', 'none',
    '-chardev', 'stdio,id=console,signal=off',
    '-serial', 'chardev:console',
    '-kernel', spec.kernel,
    ...(spec.initrd ? ['-initrd', spec.initrd] : []),
    '-append', kernelArgs.join(' '),
    '-device', 'virtio-rng-device',
    '-device', 'virtio-serial-device',
    '-chardev', `socket,id=agent,path=${agentSocketPath(spec.runDir)},server=on,wait=off`,
    '-device', `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`,
  ];
  spec.drives.forEach((drive, index) => {
    args.push(
      '-drive', `file=${drive.path},format=raw,if=none,id=drive${index},readonly=${drive.readOnly ? 'on' : 'off'}`,
      '-device', `virtio-blk-device,drive=drive${index},serial=${driveSerial(index)}`,
    );
  });
  return args;
}

/** The ID a guest sees in /sys/block/vdX/serial for the index-th extra drive. */
export function driveSerial(index: number): string {
  return `mvm${index}`;
}

export function agentSocketPath(runDir: string): string {
  return join(runDir, 'agent.sock');
}

export class QemuBackend implements Backend {
  readonly name = 'qemu' as const;
  private readonly kvm = kvmUsable();

  constructor(private readonly qemuBinary = process.env.MVM_QEMU || 'qemu-system-x86_64') {}

  capabilities(): BackendCapabilities {
    // The agent talks over a virtio-serial port: Node.js has no AF_VSOCK sockets, and the port
    // works with or without /dev/vhost-vsock.
    return { kvm: this.kvm, snapshots: true, vsock: false };
  }

  async start(spec: VmSpec, signal: AbortSignal): Promise<RunningVm> {
    const qemu = findExecutable(this.qemuBinary);
    if (!qemu) {
      throw new MvmError(
        `QEMU not found (${this.qemuBinary}): install it with 'apt-get install qemu-system-x86', or set MVM_QEMU to its path`,
      );
    }
    const setpriv = findExecutable('setpriv');
    if (!setpriv) throw new MvmError(`setpriv not found: install util-linux ('apt-get install util-linux')`);
    signal.throwIfAborted();
    const args = qemuArgs(spec, { kvm: this.kvm, tscKhz: hostTscKhz() });
    // setpriv execs QEMU in place (same pid) with a parent-death signal, so the VMM dies with
    // mvmctl even when mvmctl is killed with SIGKILL and has no chance to clean up.
    const child = spawn(setpriv, ['--pdeathsig', 'KILL', '--', qemu, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    return new QemuVm(spec, child);
  }
}

class QemuVm implements RunningVm {
  readonly vmmPid: number;
  readonly exited: Promise<VmExit>;
  private readonly console = new ConsoleBuffer();
  private readonly stderrTail = new ConsoleBuffer();
  private hasExited = false;

  constructor(private readonly spec: VmSpec, private readonly child: ChildProcess) {
    if (child.pid === undefined) throw new MvmError(`could not start QEMU for ${spec.name}`);
    this.vmmPid = child.pid;
    child.stdout!.on('data', (chunk: Buffer) => this.console.push(chunk, spec.onConsoleLine));
    child.stderr!.on('data', (chunk: Buffer) => this.stderrTail.push(chunk, spec.onConsoleLine));
    this.exited = new Promise((resolve) => {
      child.once('close', (code, signal) => {
        this.hasExited = true;
        resolve({ code, signal });
      });
      child.once('error', () => {
        this.hasExited = true;
        resolve({ code: null, signal: null });
      });
    });
  }

  get name(): string {
    return this.spec.name;
  }

  consoleTail(maxLines: number): string[] {
    return [...this.console.tail(maxLines), ...this.stderrTail.tail(maxLines)].slice(-maxLines);
  }

  async connectAgent(signal: AbortSignal): Promise<Socket> {
    const path = agentSocketPath(this.spec.runDir);
    // QEMU creates the socket while it starts up, before the guest runs: retry briefly until it is there.
    for (;;) {
      signal.throwIfAborted();
      if (this.hasExited) throw new MvmError(`QEMU exited before the guest agent channel opened`, 125, this.consoleTail(20));
      try {
        return await new Promise<Socket>((resolve, reject) => {
          const socket = connect(path);
          socket.once('connect', () => {
            socket.removeListener('error', reject);
            resolve(socket);
          });
          socket.once('error', reject);
        });
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        if (code !== 'ENOENT' && code !== 'ECONNREFUSED') throw error;
        await sleep(10, undefined, { signal });
      }
    }
  }

  async kill(): Promise<VmExit> {
    if (!this.hasExited) this.child.kill('SIGKILL');
    return this.exited;
  }
}
