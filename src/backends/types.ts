import type { Duplex } from 'node:stream';

/** An extra block device given to the guest, e.g. an `--add-dir` image. Appears as /dev/vdb, /dev/vdc… in order. */
export interface DriveSpec {
  path: string;
  readOnly: boolean;
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
  cpus: number;
  memoryMiB: number;
  drives: readonly DriveSpec[];
  /** Receives each line the guest prints on its serial console (the kernel log, init, the agent's diagnostics). */
  onConsoleLine?: (line: string) => void;
}

export interface BackendCapabilities {
  /** Hardware acceleration in use; without it the backend emulates the CPU (QEMU TCG) and is much slower. */
  kvm: boolean;
  snapshots: boolean;
  vsock: boolean;
}

export interface VmExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface RunningVm {
  readonly name: string;
  /** PID of the VMM process itself (not a wrapper), recorded so `ls`/`down` can reap it. */
  readonly vmmPid: number;
  /** Settles when the VMM process has exited, however that happened. */
  readonly exited: Promise<VmExit>;
  /** Opens the byte stream to the guest agent; the agent may not be listening yet (see AgentSession's HELLO retry). */
  connectAgent(signal: AbortSignal): Promise<Duplex>;
  /** The last lines of the guest console, for diagnosing a failed boot. */
  consoleTail(maxLines: number): string[];
  /** Kills the VMM if it is still running and waits for it to be gone. Idempotent. */
  kill(): Promise<VmExit>;
}

export interface Backend {
  readonly name: 'qemu' | 'firecracker';
  capabilities(): BackendCapabilities;
  start(spec: VmSpec, signal: AbortSignal): Promise<RunningVm>;
}
