import type { Duplex } from 'node:stream';
import type { Accel } from '../accel/index.js';

/** An extra block device given to the guest, e.g. an `--add-dir` image. Appears as /dev/vdb, /dev/vdc… in order. */
export interface DriveSpec {
  path: string;
  readOnly: boolean;
}

/**
 * A template's root file system drive. The guest finds it by its serial (`mvmroot`), not by its
 * position. With `copyOnWrite` the guest's writes go to a throwaway overlay that dies with the VM
 * (QEMU `snapshot=on`): the file itself is never written, so many VMs can share it.
 */
export interface RootDriveSpec {
  path: string;
  format: 'raw' | 'qcow2';
  copyOnWrite: boolean;
}

/** Guest RAM backed by a file: `shared` (writes land in the file) to capture a snapshot, private copy-on-write to restore one. */
export interface MemoryFileSpec {
  path: string;
  shared: boolean;
}

export interface VmSpec {
  /** Unique VM name, e.g. exec-1f2e-a81c. */
  name: string;
  /** Private directory of this VM: sockets, console log, staging images live here. */
  runDir: string;
  kernel: string;
  initrd?: string;
  /** Kernel command-line arguments the image needs; the backend adds its own (console, timers, agent transport). */
  kernelArgs: readonly string[];
  /** KVM, or TCG software emulation (QEMU only); chosen by src/accel/ for this host. */
  accel: Accel;
  cpus: number;
  memoryMiB: number;
  drives: readonly DriveSpec[];
  /** A template's root drive (attached before `drives`, serial `mvmroot`). */
  rootDrive?: RootDriveSpec;
  /** Guest RAM in a file instead of anonymous memory (snapshots). */
  memoryFile?: MemoryFileSpec;
  /**
   * Restore: the device state file of a snapshot. The VMM starts waiting for it; call
   * `RunningVm.finishRestore` to load it and resume the guest. Needs `memoryFile` (private) with
   * the snapshot's RAM and otherwise the same spec as the VM the snapshot was taken from.
   */
  incomingState?: string;
  /** Receives each line the guest prints on its serial console (the kernel log, init, the agent's diagnostics). */
  onConsoleLine?: (line: string) => void;
}

export interface BackendCapabilities {
  /** Accelerators the backend can run a guest with (Firecracker: KVM only). */
  accels: readonly Accel[];
  snapshots: boolean;
  vsock: boolean;
}

export interface VmExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Why a guest cannot go on, as its VMM reported it. */
export interface GuestFailure {
  /** One line for the user, e.g. `KVM internal error. Suberror: 1` or `the VMM exited (status 1)`. */
  reason: string;
  /** KVM could not run the guest (an internal error, a refused VM entry): under TCG it may well run. */
  accelFailure: boolean;
}

export interface RunningVm {
  readonly name: string;
  /** PID of the VMM process itself (not a wrapper), recorded so `ls`/`down` can reap it. */
  readonly vmmPid: number;
  /** Settles when the VMM process has exited, however that happened. */
  readonly exited: Promise<VmExit>;
  /**
   * Settles (never rejects) as soon as the VMM reports that the guest cannot go on: the VMM exited,
   * KVM failed to run it, or the VMM stopped it in an error state and would otherwise wait forever.
   */
  readonly failed: Promise<GuestFailure>;
  /** Opens the byte stream to the guest agent; the agent may not be listening yet (see AgentSession's HELLO retry). */
  connectAgent(signal: AbortSignal): Promise<Duplex>;
  /** The last lines of the guest console, for diagnosing a failed boot. */
  consoleTail(maxLines: number): string[];
  /**
   * Snapshot capture (needs a shared `memoryFile`): pauses the guest, writes its device state to
   * `statePath` and ends the VMM. The RAM file then holds the guest's memory.
   */
  saveSnapshot?(statePath: string, signal: AbortSignal): Promise<void>;
  /** Restore (spec had `incomingState`): loads the device state and resumes the guest. */
  finishRestore?(signal: AbortSignal): Promise<void>;
  /** Kills the VMM if it is still running and waits for it to be gone. Idempotent. */
  kill(): Promise<VmExit>;
}

export interface Backend {
  readonly name: 'qemu' | 'firecracker';
  capabilities(): BackendCapabilities;
  start(spec: VmSpec, signal: AbortSignal): Promise<RunningVm>;
  /** Identifies the VMM build a snapshot is tied to (e.g. `QEMU emulator version 7.2.22 …`). */
  vmmVersion?(): Promise<string>;
  /** The VMM binary's path, size and mtime: a cheap check that it is the build `vmmVersion` reported before. */
  vmmIdentity?(): Promise<{ binary: string; size: number; mtimeMs: number }>;
}
