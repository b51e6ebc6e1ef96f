/**
 * A scripted guest for unit tests of the exec workflow: a Backend whose "VMM" is a real child
 * process (so it has a pid and a lifetime) and whose agent is this test's code speaking the real
 * wire protocol over a unix socket. Each test decides how the guest answers, or fails to.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createServer, connect, type Socket } from 'node:net';
import { join } from 'node:path';
import type { Backend, BackendCapabilities, GuestFailure, RunningVm, VmExit, VmSpec } from '../../src/backends/types.js';
import { Capability, encodeAgentFrame, HostFrameDecoder, type AgentMessage, type HostMessage } from '../../src/protocol/index.js';
import { createExec } from '../../src/sdk/exec.js';
import type { BootImage } from '../../src/vm/index.js';

/** Answers one host message; may send any frames, or nothing at all. */
export type GuestScript = (message: HostMessage, guest: ScriptedGuest) => void | Promise<void>;

export class ScriptedGuest {
  readonly received: HostMessage[] = [];
  constructor(
    readonly spec: VmSpec,
    private readonly socket: Socket,
  ) {}

  send(...messages: AgentMessage[]): void {
    if (!this.socket.destroyed) this.socket.write(Buffer.concat(messages.map(encodeAgentFrame)));
  }
}

/** The answers of a well-behaved agent; a script overrides what it wants to misbehave on. */
export function politeAgent(message: HostMessage, guest: ScriptedGuest): void {
  switch (message.type) {
    case 'hello':
      guest.send({ type: 'hello', version: 1, capabilities: Capability.EXEC | Capability.MOUNT, agentVersion: 'scripted 1.0' });
      return;
    case 'exec':
      guest.send({ type: 'started', pid: 2 }, { type: 'exit', kind: 0, code: 0, message: '' });
      return;
    case 'mount':
    case 'unmount':
    case 'sync':
    case 'poweroff':
      guest.send({ type: 'ok' });
      return;
    default:
      return;
  }
}

class ScriptedVm implements RunningVm {
  readonly exited: Promise<VmExit>;
  readonly failed: Promise<GuestFailure>;
  readonly agentChannel = 'scripted socket';
  private readonly hostSide: Promise<Socket>;

  constructor(
    private readonly spec: VmSpec,
    private readonly vmm: ChildProcess,
    private readonly backend: ScriptedBackend,
    script: GuestScript,
  ) {
    this.exited = new Promise((resolve) => vmm.once('close', (code, signal) => resolve({ code, signal })));
    this.failed = this.exited.then(({ code, signal }) => ({ reason: `the VMM exited (${signal ?? code})`, accelFailure: false }));
    const path = join(spec.runDir, 'scripted-agent.sock');
    const server = createServer((socket) => {
      server.close();
      const guest = new ScriptedGuest(spec, socket);
      backend.guests.push(guest);
      const decoder = new HostFrameDecoder();
      socket.on('error', () => {});
      socket.on('data', (chunk: Buffer) => {
        for (const message of decoder.push(chunk)) {
          guest.received.push(message);
          void script(message, guest);
        }
      });
      void this.exited.then(() => socket.destroy());
    });
    const listening = once(server.listen(path), 'listening');
    this.hostSide = listening.then(async () => {
      const socket = connect(path);
      await once(socket, 'connect');
      return socket;
    });
  }

  get name(): string {
    return this.spec.name;
  }

  get vmmPid(): number {
    return this.vmm.pid!;
  }

  connectAgent(): Promise<Socket> {
    return this.hostSide;
  }

  consoleTail(): string[] {
    return [];
  }

  /** The guest's VMM dies on its own, as in a guest crash or an OOM kill of QEMU. */
  crash(): void {
    this.vmm.kill('SIGKILL');
  }

  async kill(): Promise<VmExit> {
    if (this.vmm.exitCode === null && this.vmm.signalCode === null) {
      await this.backend.onKill?.(this.spec);
      this.vmm.kill('SIGKILL');
    }
    return this.exited;
  }
}

export class ScriptedBackend implements Backend {
  readonly name = 'qemu' as const;
  readonly guests: ScriptedGuest[] = [];
  readonly vms: ScriptedVm[] = [];
  /** Runs as the VMM is killed, before it dies: the guest's last moment. */
  onKill?: (spec: VmSpec) => void | Promise<void>;
  /** Makes a snapshot restore fail with this error (the VMM it started is killed first, as backends do). */
  restoreError?: Error;
  /** Every spec a VM was started with, in order. */
  readonly specs: VmSpec[] = [];

  constructor(private readonly script: GuestScript) {}

  nicUnavailable(): string | undefined {
    return undefined;
  }

  capabilities(): BackendCapabilities {
    return { accels: ['tcg'], snapshots: false, restoredDrivesReadOnly: true };
  }

  async start(spec: VmSpec): Promise<RunningVm> {
    this.specs.push(spec);
    const vmm = spawn('sleep', ['600'], { stdio: 'ignore' });
    const vm = new ScriptedVm(spec, vmm, this, this.script);
    this.vms.push(vm);
    if (spec.snapshot?.mode === 'restore' && this.restoreError) {
      await vm.kill();
      throw this.restoreError;
    }
    return vm;
  }

  /** Whether every VMM this backend started has exited. */
  allExited(): Promise<boolean> {
    return Promise.race([
      Promise.all(this.vms.map((vm) => vm.exited)).then(() => true),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 2000)),
    ]);
  }
}

/** The SDK's exec() over a ScriptedBackend whose guests follow `script` and boot `image`. */
export function scriptedExec(script: GuestScript, image: BootImage) {
  const backend = new ScriptedBackend(script);
  const exec = createExec({ backend: () => backend, defaultImage: () => async () => image });
  return { backend, exec, sent: () => backend.guests.flatMap((guest) => guest.received) };
}
