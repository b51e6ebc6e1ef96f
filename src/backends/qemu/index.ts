import { spawn, type ChildProcess } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join, relative } from 'node:path';
import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { MvmError } from '../../errors.js';
import { lastLine, runTool } from '../../run-tool.js';
import { findExecutable } from '../../which.js';
import { ConsoleBuffer } from '../console.js';
import { vmmIdentityOf, vmmVersionOf, type VmmIdentity } from '../vmm-binary.js';
import { SNAPSHOT_FILES, type Backend, type BackendCapabilities, type GuestFailure, type NicSpec, type RunningVm, type VmExit, type VmSpec } from '../types.js';
import { AGENT_VSOCK_PORT } from '../../protocol/constants.js';
import { AGENT_LISTENING_LINE, connectBootingAgent } from '../vsock/hybrid.js';
import { agentSocketPath, hostTscKhz, hybridVsockPath, qemuArgs, qemuSocketPaths, qmpSocketPath, shellQuote, vhostVsockSocketPath } from './args.js';
import { findVhostDeviceVsock, startVhostVsock, type VhostVsockDevice } from './vhost-vsock.js';
import { Qmp } from './qmp.js';
import { connectWhenListening } from '../unix-socket.js';

export { agentSocketPath, hostTscKhz, qemuArgs, qmpSocketPath } from './args.js';
export { findVhostDeviceVsock } from './vhost-vsock.js';


/**
 * What QEMU prints on stderr when KVM cannot run the guest: an instruction KVM could not emulate
 * (a paravirtual or nested KVM), or a VM entry the CPU refused (QEMU then pauses the VM and stays
 * up); or a vCPU register KVM will not take, after which QEMU aborts (kvm_pvm, seen here as
 * `failed to set MSR 0x10a to 0x69`).
 */
const ACCEL_FAILURE_LINE = /^(KVM internal error\b.*|KVM: entry failed\b.*)$/;
const ACCEL_ABORT_LINE = /^(?:qemu-system-\S+: )?(?:error: )?(failed to set MSR\b.*)$/;
/** The kind of internal error, printed a few lines after it (after the `extra data` lines). */
const ACCEL_FAILURE_KIND = /^(emulation failure)$/;
/** How long to wait for that line before reporting the error without it. */
const ACCEL_FAILURE_KIND_WAIT_MS = 100;
/** QEMU could not listen on a `-p` forward's host port; it then exits. */
const HOSTFWD_FAILURE_LINE = /Could not set up host forwarding rule '(?:tcp:)?([^-']*)-[^']*'/;

/** Run states in which QEMU keeps running but the guest never will again. */
const ERROR_STATES: Record<string, string> = {
  'internal-error': 'QEMU stopped the guest after an internal error of the accelerator',
  'guest-panicked': 'the guest kernel panicked',
  'io-error': 'a disk write failed on the host (is its file system full?)',
};

export class QemuBackend implements Backend {
  readonly name = 'qemu' as const;

  constructor(private readonly qemuBinary = process.env.MVM_QEMU || 'qemu-system-x86_64') {}

  capabilities(): BackendCapabilities {
    return { accels: ['kvm', 'tcg'], snapshots: true, restoredDrivesReadOnly: true };
  }

  nicUnavailable(nic: NicSpec): string | undefined {
    if (!nic.proxySocket) return undefined;
    if (!findExecutable('socat')) return "--allow-host needs socat on the host, which hands the guest's connections to the proxy: install it with 'apt-get install socat'";
    // socat reads its address up to the first comma; libslirp splits the command at blanks.
    if (/[,\s!]/.test(nic.proxySocket)) return `--allow-host cannot use the state directory ${nic.proxySocket}: its path has a comma or a blank; set MVM_STATE_DIR to a plain path`;
    return undefined;
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

  vmmVersion(): Promise<string> {
    return vmmVersionOf(this.qemuPath());
  }

  vmmIdentity(): Promise<VmmIdentity> {
    return vmmIdentityOf(this.qemuPath());
  }

  async createSnapshotDisk(base: string, dir: string, signal: AbortSignal): Promise<string> {
    // A qcow2 overlay: the captured guest's writes land in it, the base stays as it is. Its backing
    // path is relative, so the subject's directory may be renamed or moved as a whole.
    const disk = join(dir, 'disk.qcow2');
    const result = await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', relative(dir, base), disk], { signal, timeoutMs: 60_000 });
    if (result.code !== 0) throw new MvmError(`qemu-img create failed: ${lastLine(result.stderr)}`);
    return disk;
  }

  async start(spec: VmSpec, signal: AbortSignal): Promise<RunningVm> {
    const qemu = this.qemuPath();
    const setpriv = findExecutable('setpriv');
    if (!setpriv) throw new MvmError(`setpriv not found: install util-linux ('apt-get install util-linux')`);
    signal.throwIfAborted();
    // A VM directory may see a second start (a TCG boot after KVM failed, a cold boot after a
    // failed restore): the first one's sockets would be mistaken for the new VMM's.
    await Promise.all(qemuSocketPaths(spec.runDir).map((path) => rm(path, { force: true })));
    const vsock = this.usesVsock(spec);
    // The device first: QEMU connects to its control socket as it starts.
    const device = vsock
      ? await startVhostVsock({ binary: vsock, setpriv, controlSocket: vhostVsockSocketPath(spec.runDir), udsPath: hybridVsockPath(spec.runDir), signal })
      : undefined;
    // libslirp runs this once per guest connection, double-forked (so no parent-death signal can
    // tie it to QEMU): it ends on EOF, when QEMU's end of the connection or the proxy's closes.
    const proxyCommand = spec.nic?.proxySocket ? [findExecutable('socat') ?? 'socat', '-', `UNIX-CONNECT:${spec.nic.proxySocket}`] : undefined;
    const args = qemuArgs(spec, { tscKhz: hostTscKhz(), vsock: device !== undefined, proxyCommand });
    // setpriv execs QEMU in place (same pid) with a parent-death signal, so the VMM dies with
    // mvmctl even when mvmctl is killed with SIGKILL and has no chance to clean up.
    const child = spawn(setpriv, ['--pdeathsig', 'KILL', '--', qemu, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      // snapshot=on drives put their temporary overlay in TMPDIR: keep it in the VM's own directory.
      ...(spec.rootDrive?.copyOnWrite ? { env: { ...process.env, TMPDIR: spec.runDir } } : {}),
    });
    const vm = new QemuVm(spec, child, device);
    if (spec.snapshot?.mode === 'restore') {
      try {
        await vm.restore(signal);
      } catch (error) {
        await vm.kill();
        throw error;
      }
    }
    return vm;
  }

  /**
   * The agent's channel: vsock where vhost-device-vsock is installed and the VM is neither taken
   * into nor restored from a snapshot (QEMU 7.2 cannot migrate it); the virtio-serial port
   * otherwise, or with MVM_QEMU_VSOCK=0. Returns the device's binary for vsock.
   */
  private usesVsock(spec: VmSpec): string | undefined {
    if (spec.snapshot || process.env.MVM_QEMU_VSOCK === '0') return undefined;
    return findVhostDeviceVsock();
  }
}

class QemuVm implements RunningVm {
  readonly vmmPid: number;
  readonly exited: Promise<VmExit>;
  readonly failed: Promise<GuestFailure>;
  private readonly console = new ConsoleBuffer();
  private markAgentListening!: () => void;
  private readonly agentListening = new Promise<void>((resolve) => (this.markAgentListening = resolve));
  private readonly stderrTail = new ConsoleBuffer();
  private hasExited = false;
  private reportFailure!: (failure: GuestFailure) => void;
  /** Ends the monitor watch when the VM is torn down. */
  private readonly watch = new AbortController();
  private qmpClient?: Promise<Qmp>;

  readonly agentChannel: string;

  constructor(
    private readonly spec: VmSpec,
    private readonly child: ChildProcess,
    private readonly vsockDevice?: VhostVsockDevice,
  ) {
    if (child.pid === undefined) {
      void vsockDevice?.kill();
      throw new MvmError(`could not start QEMU for ${spec.name}`);
    }
    this.agentChannel = vsockDevice ? 'vsock (vhost-device-vsock)' : 'virtio-serial port';
    this.vmmPid = child.pid;
    this.failed = new Promise((resolve) => {
      this.reportFailure = resolve;
    });
    child.stdout!.on('data', (chunk: Buffer) =>
      this.console.push(chunk, (line) => {
        if (AGENT_LISTENING_LINE.test(line)) this.markAgentListening();
        spec.onConsoleLine?.(line);
      }),
    );
    let accelError: string | undefined;
    const reportAccelError = (kind?: string) => {
      if (accelError) this.reportFailure({ reason: kind ? `${accelError} (${kind})` : accelError, accelFailure: true });
    };
    child.stderr!.on('data', (chunk: Buffer) =>
      this.stderrTail.push(chunk, (line) => {
        spec.onConsoleLine?.(line);
        const hostfwd = HOSTFWD_FAILURE_LINE.exec(line);
        if (hostfwd) this.reportFailure({ reason: `-p: cannot listen on ${hostfwd[1]} (is the port in use, or the address not on this host?)`, accelFailure: false });
        if (spec.accel !== 'kvm') return;
        const abort = ACCEL_ABORT_LINE.exec(line.trim());
        if (abort) this.reportFailure({ reason: `KVM refused the vCPU state: ${abort[1]}`, accelFailure: true });
        const error = ACCEL_FAILURE_LINE.exec(line.trim());
        if (error && !accelError) {
          accelError = error[1]!;
          setTimeout(reportAccelError, ACCEL_FAILURE_KIND_WAIT_MS).unref();
        }
        const kind = ACCEL_FAILURE_KIND.exec(line.trim());
        if (kind) reportAccelError(kind[1]);
      }),
    );
    this.exited = new Promise((resolve) => {
      child.once('close', (code, signal) => {
        this.hasExited = true;
        this.watch.abort();
        resolve({ code, signal });
      });
      child.once('error', () => {
        this.hasExited = true;
        this.watch.abort();
        resolve({ code: null, signal: null });
      });
    });
    // The vsock device serves this VMM only: it goes when the VMM does.
    void this.exited.then(() => vsockDevice?.kill());
    void this.exited.then(({ code, signal }) =>
      this.reportFailure({ reason: `the VMM exited (${signal ? `signal ${signal}` : `status ${code}`})`, accelFailure: false }),
    );
    // Connecting starts the watch of the guest's run state.
    this.qmp(this.watch.signal).catch(() => {});
  }

  get name(): string {
    return this.spec.name;
  }

  /** A guest QEMU stopped in an error state stays paused forever: report it instead of waiting. */
  private onMonitorEvent(event: string): void {
    if (event !== 'STOP' && event !== 'GUEST_PANICKED') return;
    void this.qmpClient
      ?.then((qmp) => qmp.execute('query-status'))
      .then((status) => {
        const state = (status as { status?: string }).status ?? '';
        const why = ERROR_STATES[state];
        if (why) this.reportFailure({ reason: `${why} (run state ${state})`, accelFailure: state === 'internal-error' && this.spec.accel === 'kvm' });
      })
      .catch(() => {});
  }

  consoleTail(maxLines: number): string[] {
    return [...this.console.tail(maxLines), ...this.stderrTail.tail(maxLines)].slice(-maxLines);
  }

  async connectAgent(signal: AbortSignal): Promise<Socket> {
    const options = {
      signal,
      gone: () => this.hasExited,
      goneError: () => new MvmError(`QEMU exited before the guest agent channel opened`, 125, this.consoleTail(20)),
      retryMs: 10,
    };
    if (!this.vsockDevice) return connectWhenListening(agentSocketPath(this.spec.runDir), options);
    // vsock is used only for cold boots (usesVsock): the guest is booting.
    return connectBootingAgent(hybridVsockPath(this.spec.runDir), AGENT_VSOCK_PORT, this.agentListening, options);
  }

  private qmp(signal: AbortSignal): Promise<Qmp> {
    this.qmpClient ??= Qmp.connect(qmpSocketPath(this.spec.runDir), () => this.hasExited, this.watch.signal, (event) => this.onMonitorEvent(event));
    return signal === this.watch.signal ? this.qmpClient : abortable(this.qmpClient, signal);
  }

  async saveSnapshot(signal: AbortSignal): Promise<void> {
    if (this.spec.snapshot?.mode !== 'capture') throw new MvmError('this VM was not started to take a snapshot');
    const statePath = join(this.spec.snapshot.dir, SNAPSHOT_FILES.state);
    const qmp = await this.qmp(signal);
    // x-ignore-shared: RAM stays in the file and is not copied into the stream (44 KB of device state).
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await qmp.execute('stop');
    await qmp.execute('migrate', { uri: `exec:cat > ${shellQuote(statePath)}` });
    await waitForMigration(qmp, signal);
    await qmp.execute('quit').catch(() => {});
    await Promise.race([this.exited, sleep(5_000, undefined, { signal })]);
    await this.kill();
  }

  /** Loads the snapshot's device state (RAM is the private mapping of its file) and resumes the guest. */
  async restore(signal: AbortSignal): Promise<void> {
    const statePath = join(this.spec.snapshot!.dir, SNAPSHOT_FILES.state);
    const died = this.failed.then((failure): never => {
      throw new MvmError(`${failure.reason}: ${this.consoleTail(3).join(' | ') || 'no output'}`);
    });
    died.catch(() => {});
    await Promise.race([
      (async () => {
        const qmp = await this.qmp(signal);
        await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
        await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(statePath)}` });
        await waitForMigration(qmp, signal);
        // The snapshot was taken paused, so the restored VM stays paused until told to run.
        await qmp.execute('cont');
      })(),
      died,
    ]);
  }

  async kill(): Promise<VmExit> {
    if (!this.hasExited) this.child.kill('SIGKILL');
    const [exit] = await Promise.all([this.exited, this.vsockDevice?.kill()]);
    void this.qmpClient?.then((qmp) => qmp.close(), () => {});
    return exit;
  }
}

function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

/** Polls QEMU's migration (a snapshot written or loaded) until it completes; throws on failure or after 60 s. */
export async function waitForMigration(qmp: Qmp, signal: AbortSignal): Promise<void> {
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
