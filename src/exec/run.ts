/**
 * `exec`: one command in a fresh microVM, torn down whatever happens. The lifecycle is LiveVm's
 * (microvm.ts); exec adds one deadline over the whole run, so that no guest, however it behaves,
 * keeps the caller waiting past boot timeout + --timeout + a margin.
 */
import type { Readable, Writable } from 'node:stream';
import { exitStatusToCode, type ExecHandle, type ExitStatus } from '../protocol/index.js';
import type { CommandRequest } from './command.js';
import { LiveVm, type VmDeps, type VmIo, type VmRequest } from './microvm.js';

export type ExecRequest = Omit<VmRequest, 'label'> & CommandRequest;

export interface ExecIo extends VmIo {
  stdin: Readable;
  stdout: Writable;
  stderr: Writable;
  /** Called once the VM is up (booted or restored, its directories mounted), before the command is sent. */
  onVmReady?: (name: string) => void;
  /** Called once the agent has answered the command: its `signal(signo)` reaches the command's process group; `pid` is null when it could not start. */
  onCommandStarted?: (command: Pick<ExecHandle, 'signal' | 'pid' | 'resize'>) => void;
}

export interface ExecDeps extends VmDeps {
  /** Replaces GUEST_MARGIN_MS (tests). */
  guestMarginMs?: number;
}

export interface ExecResult {
  exitCode: number;
  status: ExitStatus;
}

/**
 * What the guest may add to the boot timeout and --timeout in all (mounts, unmounts, power-off)
 * before the VM is killed: whatever the guest does or fails to do, the run ends.
 */
const GUEST_MARGIN_MS = 120_000;

/**
 * Runs one command in a fresh microVM and tears the VM down whatever happens. Aborting `signal`
 * (Ctrl-C, SIGTERM, `mvmctl down`) kills the VM and rejects with the signal's reason.
 */
export async function execInMicroVm(request: ExecRequest, io: ExecIo, deps: ExecDeps, signal: AbortSignal): Promise<ExecResult> {
  const guestLimitMs = deps.bootTimeoutMs + request.timeoutSeconds * 1000 + (deps.guestMarginMs ?? GUEST_MARGIN_MS);
  const vm = await LiveVm.start({ ...request, label: request.argv }, io, deps, signal, { guestLimitMs });
  try {
    io.onVmReady?.(vm.name);
    const status = await vm.run(request, io);
    // A timed-out command's directories are not synced: its writes may be half done.
    await vm.stop({ sync: status.kind !== 'timedOut' });
    return { exitCode: exitStatusToCode(status), status };
  } finally {
    await vm.release();
  }
}
