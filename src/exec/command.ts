/** One command in a running VM through its agent session, and the VM's power-off after the last one. */
import type { Readable, Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { RunningVm } from '../backends/types.js';
import { MvmError } from '../errors.js';
import { AgentConnectionError, type AgentSession, type ExecHandle, type ExecUser, type ExitStatus, type TtySize } from '../protocol/index.js';

export interface CommandRequest {
  argv: string[];
  env: Record<string, string>;
  /** Working directory in the guest; `/` when absent. */
  cwd?: string;
  /** Create `cwd` in the guest when it is missing (launch plans' working_dir). */
  createCwd?: boolean;
  /** Who the command runs as; root when absent. */
  user?: ExecUser;
  timeoutSeconds: number;
  /** Forward `io.stdin` to the command; otherwise its stdin is /dev/null. */
  interactive: boolean;
  /** Run it on a terminal of this size in the guest; its output then all comes on stdout. */
  tty?: TtySize;
}

export interface CommandIo {
  stdin: Readable;
  stdout: Writable;
  stderr: Writable;
  /** Diagnostics for the user, one line each. */
  log: (line: string) => void;
  /** Called once the agent has answered the command: its `signal(signo)` reaches the command's process group; `pid` is null when it could not start. */
  onCommandStarted?: (command: Pick<ExecHandle, 'signal' | 'pid' | 'resize'>) => void;
}

/** Grace the host gives the agent to report its own deadline before it kills the whole VM. */
const HOST_DEADLINE_GRACE_MS = 5_000;

/**
 * Runs the command and streams its output until it has all arrived. A guest that misses the
 * command's deadline by more than the grace gets its VM killed (the status says timed out); a VM
 * that stops under the command is an MvmError (exit 125) with the console's tail.
 */
export async function runCommand(
  session: AgentSession,
  vm: RunningVm,
  request: CommandRequest,
  io: CommandIo,
  signal: AbortSignal,
  graceMs = HOST_DEADLINE_GRACE_MS,
): Promise<ExitStatus> {
  const handle = await session.exec({
    argv: request.argv,
    env: request.env,
    cwd: request.cwd,
    mkdirCwd: request.createCwd,
    ...(request.user ? { user: request.user } : {}),
    timeoutMs: request.timeoutSeconds * 1000,
    stdin: request.interactive,
    ...(request.tty ? { tty: request.tty } : {}),
    signal,
  });
  io.onCommandStarted?.(handle);
  handle.stdout.pipe(io.stdout, { end: false });
  handle.stderr.pipe(io.stderr, { end: false });
  if (handle.stdin) io.stdin.pipe(handle.stdin);

  let hostDeadline: NodeJS.Timeout | undefined;
  let vmKilledByHost = false;
  const deadlinePassed = new Promise<ExitStatus>((resolve) => {
    hostDeadline = setTimeout(() => {
      vmKilledByHost = true;
      void vm.kill();
      resolve({ kind: 'timedOut', code: 9, message: 'the guest missed its deadline; the VM was killed' });
    }, request.timeoutSeconds * 1000 + graceMs);
  });
  const vmDied = vm.failed.then((failure): never => {
    const why = failure.reason.startsWith('the VMM exited') ? 'guest crash?' : failure.reason;
    throw new MvmError(`the VM stopped before the command finished (${why})`, 125, vm.consoleTail(20));
  });
  try {
    const status = await Promise.race([
      handle.exit.catch(async (error: unknown) => {
        if (!(error instanceof AgentConnectionError) || signal.aborted) throw error;
        // The agent's end of the connection went first; the VM's end (a crash, the guest's init
        // ending the VM when its agent died) follows within moments and says more.
        await Promise.race([vmDied, sleep(1_000, undefined, { ref: false })]);
        throw new MvmError(`the guest agent went away before the command finished (${error.message})`, 125, vm.consoleTail(20));
      }),
      deadlinePassed,
      vmDied,
    ]);
    // Output written before EXIT is still on its way to io.stdout/io.stderr; only a VM the host had
    // to kill leaves streams that will never end.
    if (!vmKilledByHost) await Promise.all([finished(handle.stdout), finished(handle.stderr)]);
    if (status.kind === 'spawnFailed') io.log(status.message);
    if (status.kind === 'timedOut') io.log(`command timed out after ${request.timeoutSeconds} s`);
    return status;
  } finally {
    clearTimeout(hostDeadline);
    vmDied.catch(() => {});
    if (handle.stdin) io.stdin.unpipe(handle.stdin);
  }
}
