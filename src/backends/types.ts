import type { Duplex } from 'node:stream';
import type { Accel } from '../accel/index.js';
import type { PortForward } from '../net/spec.js';
import type { VmmIdentity } from './vmm-binary.js';

/** An extra block device given to the guest, e.g. an `--add-dir` image. Appears as /dev/vdb, /dev/vdc… in order. */
export interface DriveSpec {
  path: string;
  readOnly: boolean;
}

/**
 * A template's root file system drive. The guest finds it by its serial (`mvmroot`), not by its
 * position. With `copyOnWrite` the guest's writes go to a throwaway layer that dies with the VM
 * (QEMU: `snapshot=on`; Firecracker: a per-VM copy): the file itself is never written, so many VMs
 * can share it. A raw image, unless the backend made it itself (`createSnapshotDisk`).
 */
export interface RootDriveSpec {
  path: string;
  copyOnWrite: boolean;
}

/**
 * The files of a snapshot, in the directory `SnapshotSpec.dir`, written by the backend's
 * `saveSnapshot` and read by its restore. Their format is the backend's own.
 */
export const SNAPSHOT_FILES = { memory: 'ram', state: 'state' } as const;

/**
 * `capture`: the VM is booted so that `saveSnapshot` can write a snapshot into `dir`.
 * `restore`: the VM is started from the snapshot in `dir` instead of booting (the spec must
 * otherwise match the captured VM's, drives by position); the files are never written, so any
 * number of VMs can restore one snapshot at once.
 */
export interface SnapshotSpec {
  mode: 'capture' | 'restore';
  dir: string;
}

/**
 * The guest's NIC, addressed as src/net/spec.ts GUEST_NET says (the kernel's `ip=` argument in
 * `kernelArgs` configures it). `restricted`: nothing the guest sends leaves the host's VMM except
 * connections to the proxy address, which go to `proxySocket`, and the answers to `forwards`.
 */
export interface NicSpec {
  restricted: boolean;
  proxySocket?: string;
  forwards: readonly PortForward[];
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
  snapshot?: SnapshotSpec;
  /** The guest's NIC; absent: the guest has none. */
  nic?: NicSpec;
  /** Receives each line the guest prints on its serial console (the kernel log, init, the agent's diagnostics). */
  onConsoleLine?: (line: string) => void;
}

export interface BackendCapabilities {
  /** Accelerators the backend can run a guest with (Firecracker: KVM only). */
  accels: readonly Accel[];
  snapshots: boolean;
  /** A restore can attach a drive read-only at the host's block layer although the captured VM had it writable. */
  restoredDrivesReadOnly: boolean;
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
  /** How the host reaches the agent, for `-v`: e.g. `vsock`, `virtio-serial port`. */
  readonly agentChannel: string;
  /** Capture (spec had `snapshot.mode` capture): pauses the guest, writes the snapshot and ends the VMM. */
  saveSnapshot?(signal: AbortSignal): Promise<void>;
  /** Kills the VMM if it is still running and waits for it to be gone. Idempotent. */
  kill(): Promise<VmExit>;
}

export interface Backend {
  readonly name: 'qemu' | 'firecracker';
  capabilities(): BackendCapabilities;
  /**
   * Starts the VMM: boots the guest, or with `snapshot.mode` restore, loads the snapshot and
   * resumes it (resolving once the guest runs again). A failed start kills the VMM before it throws.
   */
  start(spec: VmSpec, signal: AbortSignal): Promise<RunningVm>;
  /** Why this backend cannot give a guest `nic` on this host (one line that names the fix); undefined when it can. */
  nicUnavailable(nic: NicSpec): string | undefined;
  /**
   * Makes in `dir` the disk a snapshot of a VM with root drive `base` is taken with: the captured
   * guest writes to it, `base` is never written. Returns its path.
   */
  createSnapshotDisk?(base: string, dir: string, signal: AbortSignal): Promise<string>;
  /** Identifies the VMM build a snapshot is tied to (e.g. `QEMU emulator version 7.2.22 …`). */
  vmmVersion?(): Promise<string>;
  /** The VMM binary's path, size and mtime: a cheap check that it is the build `vmmVersion` reported before. */
  vmmIdentity?(): Promise<VmmIdentity>;
}
