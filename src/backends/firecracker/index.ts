/**
 * The Firecracker backend: one `firecracker --api-sock S --id NAME` process per VM, configured over
 * its API (config.ts, api.ts), with the agent on Firecracker's hybrid vsock and a NIC, when asked
 * for, on an admin-made TAP device (tap.ts). Firecracker runs guests under KVM only. Its jailer
 * (chroot, namespaces, seccomp of the VMM process) is not used yet.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { MvmError } from '../../errors.js';
import { AGENT_VSOCK_PORT } from '../../protocol/constants.js';
import { lastLine, runTool } from '../../run-tool.js';
import { findExecutable } from '../../which.js';
import { ConsoleBuffer } from '../console.js';
import { vmmIdentityOf, vmmVersionOf, type VmmIdentity } from '../vmm-binary.js';
import type { Backend, BackendCapabilities, GuestFailure, NicSpec, RunningVm, VmExit, VmSpec } from '../types.js';
import { connectWhenListening } from '../unix-socket.js';
import { AGENT_LISTENING_LINE, connectBootingAgent, connectHybridVsock } from '../vsock/hybrid.js';
import { API_TIMEOUT_MS, FirecrackerApi, SNAPSHOT_API_TIMEOUT_MS } from './api.js';
import { apiSocketPath, bootCalls, restoreCalls, snapshotCalls, vsockSocketPath, type ApiCall } from './config.js';
import { tapName, tapUnavailable } from './tap.js';

/** How long Firecracker may take to serve its API socket once started. */
const API_START_TIMEOUT_MS = 10_000;
/** A copy of a root image (when the file system cannot share its blocks) may take a while. */
const DISK_COPY_TIMEOUT_MS = 600_000;

/** `MVM_FIRECRACKER`, else `firecracker` on PATH; undefined when absent. */
export function findFirecracker(env: NodeJS.ProcessEnv = process.env): string | undefined {
  return findExecutable(env.MVM_FIRECRACKER || 'firecracker');
}

export class FirecrackerBackend implements Backend {
  readonly name = 'firecracker' as const;

  /** `env`: where MVM_FIRECRACKER and MVM_FIRECRACKER_TAP are read. */
  constructor(private readonly env: NodeJS.ProcessEnv = process.env) {}

  capabilities(): BackendCapabilities {
    // Drives a restore attaches can point at new files, but their read-only flag is the captured
    // VM's (PATCH /drives takes no is_read_only): read-only --add-dirs boot cold.
    return { accels: ['kvm'], snapshots: true, restoredDrivesReadOnly: false };
  }

  nicUnavailable(nic: NicSpec): string | undefined {
    return tapUnavailable(nic, this.env);
  }

  private binary(): string {
    const found = findFirecracker(this.env);
    if (!found) {
      throw new MvmError(
        `Firecracker not found (${this.env.MVM_FIRECRACKER || 'firecracker'}): put its release binary on PATH or set MVM_FIRECRACKER to it; or use --backend qemu`,
      );
    }
    return found;
  }

  vmmVersion(): Promise<string> {
    return vmmVersionOf(this.binary());
  }

  vmmIdentity(): Promise<VmmIdentity> {
    return vmmIdentityOf(this.binary());
  }

  async createSnapshotDisk(base: string, dir: string, signal: AbortSignal): Promise<string> {
    const disk = join(dir, 'disk.raw');
    await copyDisk(base, disk, signal);
    return disk;
  }

  async start(spec: VmSpec, signal: AbortSignal): Promise<RunningVm> {
    if (spec.accel !== 'kvm') throw new MvmError('the firecracker backend runs guests under KVM only: use --backend qemu for TCG');
    const binary = this.binary();
    const tap = this.tapFor(spec);
    const setpriv = findExecutable('setpriv');
    if (!setpriv) throw new MvmError(`setpriv not found: install util-linux ('apt-get install util-linux')`);
    signal.throwIfAborted();
    const apiSocket = apiSocketPath(spec.runDir);
    // A VM directory may see a second start (a cold boot after a failed restore).
    await Promise.all([apiSocket, vsockSocketPath(spec.runDir)].map((path) => rm(path, { force: true })));
    // Firecracker has no copy-on-write drives: a VM that must not write its root image gets a copy
    // (cheap where the file system shares blocks, e.g. btrfs or XFS reflinks).
    const rootPath = spec.rootDrive
      ? spec.rootDrive.copyOnWrite
        ? await copyDisk(spec.rootDrive.path, join(spec.runDir, 'root.raw'), signal).then(() => join(spec.runDir, 'root.raw'))
        : spec.rootDrive.path
      : undefined;
    // setpriv execs Firecracker in place (same pid) with a parent-death signal: the VMM dies with
    // mvmctl even when mvmctl is killed with SIGKILL.
    const child = spawn(setpriv, ['--pdeathsig', 'KILL', '--', binary, '--api-sock', apiSocket, '--id', spec.name], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const vm = new FirecrackerVm(spec, child, new FirecrackerApi(apiSocket));
    try {
      await vm.waitForApi(signal);
      const calls = spec.snapshot?.mode === 'restore' ? restoreCalls({ ...spec, snapshot: spec.snapshot }, rootPath, tap) : bootCalls(spec, rootPath, tap);
      await vm.send(calls, signal, API_TIMEOUT_MS);
      return vm;
    } catch (error) {
      await vm.kill();
      throw error;
    }
  }

  /** The TAP for the spec's NIC, checked again for callers that did not ask nicUnavailable first. */
  private tapFor(spec: VmSpec): string | undefined {
    if (!spec.nic) return undefined;
    const unavailable = this.nicUnavailable(spec.nic);
    if (unavailable) throw new MvmError(unavailable);
    return tapName(this.env);
  }
}

async function copyDisk(from: string, to: string, signal: AbortSignal): Promise<void> {
  const result = await runTool('cp', ['--reflink=auto', '--sparse=always', '--', from, to], { signal, timeoutMs: DISK_COPY_TIMEOUT_MS });
  if (result.code !== 0) throw new MvmError(`could not copy the root drive ${from}: ${lastLine(result.stderr)}`);
}

class FirecrackerVm implements RunningVm {
  readonly vmmPid: number;
  readonly exited: Promise<VmExit>;
  readonly failed: Promise<GuestFailure>;
  readonly agentChannel = 'vsock (Firecracker)';
  private readonly console = new ConsoleBuffer();
  private hasExited = false;
  private markAgentListening!: () => void;
  private readonly agentListening = new Promise<void>((resolve) => (this.markAgentListening = resolve));

  constructor(private readonly spec: VmSpec, private readonly child: ChildProcess, private readonly api: FirecrackerApi) {
    if (child.pid === undefined) throw new MvmError(`could not start Firecracker for ${spec.name}`);
    this.vmmPid = child.pid;
    const onLine = (line: string) => {
      if (AGENT_LISTENING_LINE.test(line)) this.markAgentListening();
      spec.onConsoleLine?.(line);
    };
    // The guest's serial console and Firecracker's own log lines share its stdout and stderr.
    child.stdout!.on('data', (chunk: Buffer) => this.console.push(chunk, onLine));
    child.stderr!.on('data', (chunk: Buffer) => this.console.push(chunk, onLine));
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
    this.failed = this.exited.then(({ code, signal }) => ({
      reason: `the VMM exited (${signal ? `signal ${signal}` : `status ${code}`})`,
      accelFailure: false,
    }));
  }

  get name(): string {
    return this.spec.name;
  }

  async waitForApi(signal: AbortSignal): Promise<void> {
    const attempt = AbortSignal.any([signal, AbortSignal.timeout(API_START_TIMEOUT_MS)]);
    try {
      const probe = await connectWhenListening(apiSocketPath(this.spec.runDir), {
        signal: attempt,
        gone: () => this.hasExited,
        goneError: () => new MvmError('Firecracker exited at start', 125, this.consoleTail(20)),
        retryMs: 5,
      });
      probe.destroy();
    } catch (error) {
      if (!signal.aborted && attempt.aborted) throw new MvmError(`Firecracker did not serve its API within ${API_START_TIMEOUT_MS / 1000} s`, 125, this.consoleTail(20));
      throw error;
    }
  }

  async send(calls: readonly ApiCall[], signal: AbortSignal, timeoutMs: number): Promise<void> {
    for (const call of calls) {
      if (call.method === 'PUT') await this.api.put(call.path, call.body, { signal, timeoutMs });
      else await this.api.patch(call.path, call.body, { signal, timeoutMs });
    }
  }

  connectAgent(signal: AbortSignal): Promise<Socket> {
    const options = {
      signal,
      gone: () => this.hasExited,
      goneError: () => new MvmError('Firecracker exited before the guest agent answered', 125, this.consoleTail(20)),
    };
    const path = vsockSocketPath(this.spec.runDir);
    // A restored agent listens already (and prints nothing); a booting one is waited for, so that
    // its refused CONNECTs cannot wedge the vhost-device-vsock the test double serves vsock with.
    if (this.spec.snapshot?.mode === 'restore') return connectHybridVsock(path, AGENT_VSOCK_PORT, { ...options, retryMs: 20 });
    return connectBootingAgent(path, AGENT_VSOCK_PORT, this.agentListening, options);
  }

  consoleTail(maxLines: number): string[] {
    return this.console.tail(maxLines);
  }

  async saveSnapshot(signal: AbortSignal): Promise<void> {
    if (this.spec.snapshot?.mode !== 'capture') throw new MvmError('this VM was not started to take a snapshot');
    await this.send(snapshotCalls(this.spec.snapshot.dir), signal, SNAPSHOT_API_TIMEOUT_MS);
    await this.kill();
  }

  async kill(): Promise<VmExit> {
    if (!this.hasExited) this.child.kill('SIGKILL');
    return this.exited;
  }
}
