import { setTimeout as sleep } from 'node:timers/promises';
import type { RunningVm } from '../backends/types.js';
import { MvmError } from '../errors.js';
import { AgentSession } from '../protocol/index.js';

class AgentSilent extends Error {}

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
 * and the console's last lines when the VM dies first or its agent stays silent; an abort of
 * `signal` rethrows the signal's reason.
 */
export async function openAgentSession(vm: RunningVm, options: OpenAgentOptions): Promise<AgentSession> {
  const { signal, timeoutMs, guest } = options;
  const attempt = new AbortController();
  const onAbort = () => attempt.abort(signal.reason);
  signal.addEventListener('abort', onAbort, { once: true });
  const timer = setTimeout(() => attempt.abort(new AgentSilent()), timeoutMs);
  const stopped = () => new MvmError(`${guest} stopped during boot (kernel panic or bad image?)`, 125, vm.consoleTail(20));
  const vmDied = vm.exited.then((): never => {
    throw stopped();
  });
  vmDied.catch(() => {});
  try {
    return await Promise.race([
      (async () => AgentSession.connect(await vm.connectAgent(attempt.signal), { signal: attempt.signal }))(),
      vmDied,
    ]);
  } catch (error) {
    if (signal.aborted) throw signal.reason;
    if (attempt.signal.reason instanceof AgentSilent) {
      const hint = options.timeoutHint ? ` (${options.timeoutHint})` : '';
      throw new MvmError(`${guest}'s agent did not answer within ${Number((timeoutMs / 1000).toFixed(1))} s${hint}`, 125, vm.consoleTail(20));
    }
    // A VMM that fails at start-up (bad kernel, bad flags) can still accept the agent connection
    // first; what the user needs is why it died, not the broken connection that followed.
    const exited = await Promise.race([vm.exited, sleep(1000, undefined, { ref: false })]);
    if (exited) throw stopped();
    throw error;
  } finally {
    clearTimeout(timer);
    signal.removeEventListener('abort', onAbort);
  }
}
