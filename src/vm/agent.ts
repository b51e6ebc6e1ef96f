/** Opening the agent session of a VM that has just started, booted or restored. */
import { setTimeout as sleep } from 'node:timers/promises';
import type { GuestFailure, RunningVm } from '../backends/types.js';
import { MvmError } from '../errors.js';
import { AgentSession } from '../protocol/index.js';

class AgentSilent extends Error {}

/** The VMM reported, before the agent answered, that the guest cannot go on. */
export class GuestFailedError extends MvmError {
  constructor(message: string, readonly failure: GuestFailure, details: readonly string[]) {
    super(message, 125, details);
  }
}

export interface OpenAgentOptions {
  signal: AbortSignal;
  /** How long the guest may take to answer HELLO. */
  timeoutMs: number;
  /** Names the guest in messages, e.g. `the guest` or `the template's guest`. */
  guest: string;
  /** Appended to the timeout message: what the user can do about it. */
  timeoutHint?: string;
}

/**
 * Opens the agent session of a VM that has just started (booted or restored). Fails with one line
 * and the console's last lines as soon as the VMM reports the guest cannot go on, or when its agent
 * stays silent; an abort of `signal` rethrows the signal's reason.
 */
export async function openAgentSession(vm: RunningVm, options: OpenAgentOptions): Promise<AgentSession> {
  const { signal, timeoutMs, guest } = options;
  const attempt = new AbortController();
  const onAbort = () => attempt.abort(signal.reason);
  signal.addEventListener('abort', onAbort, { once: true });
  const timer = setTimeout(() => attempt.abort(new AgentSilent()), timeoutMs);
  const failedError = (failure: GuestFailure) =>
    new GuestFailedError(
      failure.accelFailure
        ? `KVM cannot run ${guest}: ${failure.reason}`
        : failure.reason.startsWith('the VMM exited')
          ? `${guest} stopped during boot (kernel panic or bad image?)`
          : `${guest} stopped during boot: ${failure.reason}`,
      failure,
      vm.consoleTail(20),
    );
  const vmFailed = vm.failed.then((failure): never => {
    throw failedError(failure);
  });
  vmFailed.catch(() => {});
  try {
    return await Promise.race([
      (async () => AgentSession.connect(await vm.connectAgent(attempt.signal), { signal: attempt.signal }))(),
      vmFailed,
    ]);
  } catch (error) {
    if (signal.aborted) throw signal.reason;
    if (error instanceof GuestFailedError) throw error;
    if (attempt.signal.reason instanceof AgentSilent) {
      const hint = options.timeoutHint ? ` (${options.timeoutHint})` : '';
      throw new MvmError(`${guest}'s agent did not answer within ${secondsText(timeoutMs)} s${hint}`, 125, vm.consoleTail(20));
    }
    // A VMM that fails at start-up (bad kernel, bad flags) can still accept the agent connection
    // first; what the user needs is why it died, not the broken connection that followed.
    const failure = await Promise.race([vm.failed, sleep(1000, undefined, { ref: false })]);
    if (failure) throw failedError(failure);
    throw error;
  } finally {
    clearTimeout(timer);
    signal.removeEventListener('abort', onAbort);
  }
}

/** Seconds as a user wrote them: 60, 1.5, 0.001 (not rounded down to 0). */
function secondsText(ms: number): string {
  const seconds = ms / 1000;
  return String(seconds >= 1 ? Number(seconds.toFixed(1)) : Number(seconds.toPrecision(2)));
}
