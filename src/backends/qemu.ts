import { spawn, type ChildProcess } from 'node:child_process';
import { execFile } from 'node:child_process';
import { accessSync, constants, readFileSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { MvmError } from '../errors.js';
import { AGENT_PORT_NAME } from '../protocol/constants.js';
import { findExecutable } from './which.js';
import { ConsoleBuffer } from './console.js';
import { driveSerial, ROOT_DRIVE_SERIAL } from './drives.js';
import type { Backend, BackendCapabilities, RunningVm, VmExit, VmSpec } from './types.js';

/** QEMU option values separate with commas; a comma inside a value is written twice. */
function optionValue(value: string): string {
  return value.replaceAll(',', ',,');
}

function shellQuote(value: string): string {
  return `'${value.replaceAll("'", `'\\''`)}'`;
}


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
    '-M', spec.memoryFile ? 'microvm,acpi=off,memory-backend=mem' : 'microvm,acpi=off',
    ...(spec.memoryFile
      ? [
          // share=on: guest RAM writes land in the file (capture). share=off: a private copy-on-write
          // mapping (restore), so the file is never modified and any number of VMs can map it.
          '-object',
          `memory-backend-file,id=mem,mem-path=${optionValue(spec.memoryFile.path)},size=${spec.memoryMiB}M,share=${spec.memoryFile.shared ? 'on' : 'off'}`,
        ]
      : []),
    ...(spec.memoryFile || spec.incomingState ? ['-qmp', `unix:${optionValue(qmpSocketPath(spec.runDir))},server=on,wait=off`] : []),
    ...(spec.incomingState ? ['-incoming', 'defer'] : []),
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
  if (spec.rootDrive) {
    args.push(
      '-drive',
      `file=${optionValue(spec.rootDrive.path)},format=${spec.rootDrive.format},if=none,id=rootdrive,snapshot=${spec.rootDrive.copyOnWrite ? 'on' : 'off'}`,
      '-device', `virtio-blk-device,drive=rootdrive,serial=${ROOT_DRIVE_SERIAL}`,
    );
  }
  spec.drives.forEach((drive, index) => {
    args.push(
      '-drive', `file=${drive.path},format=raw,if=none,id=drive${index},readonly=${drive.readOnly ? 'on' : 'off'}`,
      '-device', `virtio-blk-device,drive=drive${index},serial=${driveSerial(index)}`,
    );
  });
  return args;
}

export function agentSocketPath(runDir: string): string {
  return join(runDir, 'agent.sock');
}

export function qmpSocketPath(runDir: string): string {
  return join(runDir, 'qmp.sock');
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

  private qemuPath(): string {
    const qemu = findExecutable(this.qemuBinary);
    if (!qemu) {
      throw new MvmError(
        `QEMU not found (${this.qemuBinary}): install it with 'apt-get install qemu-system-x86', or set MVM_QEMU to its path`,
      );
    }
    return qemu;
  }

  async vmmVersion(): Promise<string> {
    const qemu = this.qemuPath();
    return new Promise((resolve, reject) => {
      execFile(qemu, ['--version'], { timeout: 10_000, killSignal: 'SIGKILL' }, (error, stdout) => {
        if (error) reject(new MvmError(`${qemu} --version failed: ${error.message}`));
        else resolve(stdout.split('\n')[0]!.trim());
      });
    });
  }

  async vmmIdentity(): Promise<{ binary: string; size: number; mtimeMs: number }> {
    const qemu = this.qemuPath();
    const info = await stat(qemu);
    return { binary: qemu, size: info.size, mtimeMs: info.mtimeMs };
  }

  async start(spec: VmSpec, signal: AbortSignal): Promise<RunningVm> {
    const qemu = this.qemuPath();
    const setpriv = findExecutable('setpriv');
    if (!setpriv) throw new MvmError(`setpriv not found: install util-linux ('apt-get install util-linux')`);
    signal.throwIfAborted();
    const args = qemuArgs(spec, { kvm: this.kvm, tscKhz: hostTscKhz() });
    // setpriv execs QEMU in place (same pid) with a parent-death signal, so the VMM dies with
    // mvmctl even when mvmctl is killed with SIGKILL and has no chance to clean up.
    const child = spawn(setpriv, ['--pdeathsig', 'KILL', '--', qemu, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      // snapshot=on drives put their temporary overlay in TMPDIR: keep it in the VM's own directory.
      ...(spec.rootDrive?.copyOnWrite ? { env: { ...process.env, TMPDIR: spec.runDir } } : {}),
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

  private qmpClient?: Promise<Qmp>;

  private qmp(signal: AbortSignal): Promise<Qmp> {
    this.qmpClient ??= Qmp.connect(qmpSocketPath(this.spec.runDir), () => this.hasExited, signal);
    return this.qmpClient;
  }

  async saveSnapshot(statePath: string, signal: AbortSignal): Promise<void> {
    if (!this.spec.memoryFile?.shared) throw new MvmError('a snapshot needs the guest RAM in a shared memory file');
    const qmp = await this.qmp(signal);
    // x-ignore-shared: RAM stays in the file and is not copied into the stream (44 KB of device state).
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await qmp.execute('stop');
    await qmp.execute('migrate', { uri: `exec:cat > ${shellQuote(statePath)}` });
    await waitForMigration(qmp, signal);
    await qmp.execute('quit').catch(() => {});
    qmp.close();
    await Promise.race([this.exited, sleep(5_000, undefined, { signal })]);
    await this.kill();
  }

  async finishRestore(signal: AbortSignal): Promise<void> {
    if (!this.spec.incomingState) throw new MvmError('this VM was not started to restore a snapshot');
    const qmp = await this.qmp(signal);
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(this.spec.incomingState)}` });
    await waitForMigration(qmp, signal);
    // The snapshot was taken paused, so the restored VM stays paused until told to run.
    await qmp.execute('cont');
    qmp.close();
  }

  async kill(): Promise<VmExit> {
    if (!this.hasExited) this.child.kill('SIGKILL');
    return this.exited;
  }
}

async function waitForMigration(qmp: Qmp, signal: AbortSignal): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const info = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new MvmError(`QEMU migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`);
    }
    if (Date.now() > deadline) throw new MvmError('QEMU migration did not complete within 60 s');
    await sleep(2, undefined, { signal });
  }
}

/** A minimal QMP client: one command at a time, events ignored. */
class Qmp {
  private buffer = '';
  private pending?: { resolve: (value: unknown) => void; reject: (error: Error) => void };
  private closedError?: Error;

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    const onGone = (error?: Error) => {
      this.closedError ??= new MvmError(`QEMU's monitor connection closed${error ? ` (${error.message})` : ''}`);
      this.pending?.reject(this.closedError);
      this.pending = undefined;
    };
    socket.on('error', onGone);
    socket.on('close', () => onGone());
  }

  static async connect(path: string, exited: () => boolean, signal: AbortSignal): Promise<Qmp> {
    for (;;) {
      signal.throwIfAborted();
      if (exited()) throw new MvmError('QEMU exited before its monitor socket opened');
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => {
            s.removeListener('error', reject);
            resolve(s);
          });
          s.once('error', reject);
        });
        const qmp = new Qmp(socket);
        await qmp.next(); // the greeting
        await qmp.execute('qmp_capabilities');
        return qmp;
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        if (code !== 'ENOENT' && code !== 'ECONNREFUSED') throw error;
        await sleep(2, undefined, { signal });
      }
    }
  }

  private readonly queue: unknown[] = [];
  private waiter?: (value: unknown) => void;

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (let newline = this.buffer.indexOf('\n'); newline >= 0; newline = this.buffer.indexOf('\n')) {
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (!line) continue;
      let message: Record<string, unknown>;
      try {
        message = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if ('event' in message) continue;
      if (this.waiter) {
        const waiter = this.waiter;
        this.waiter = undefined;
        waiter(message);
      } else {
        this.queue.push(message);
      }
    }
  }

  private next(): Promise<unknown> {
    if (this.queue.length > 0) return Promise.resolve(this.queue.shift());
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => {
      this.waiter = resolve;
      this.pending = { resolve, reject };
    });
  }

  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    this.socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    const reply = (await this.next()) as { return?: unknown; error?: { desc?: string } };
    if (reply.error) throw new MvmError(`QEMU ${command}: ${reply.error.desc ?? 'error'}`);
    return reply.return;
  }

  close(): void {
    this.socket.destroy();
  }
}
