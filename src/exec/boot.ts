/**
 * Starting a VM until its agent answers, with the accelerator's fallback: a boot under KVM whose
 * VMM reports that KVM cannot run the guest is killed at once, the verdict is remembered, and (with
 * `--accel auto`) the same run goes on under TCG.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { hostBootId, planAccel, recordVerdict, tcgWarning, type Accel, type AccelChoice, type AccelPlan, type VerdictKey } from '../accel/index.js';
import type { Backend, GuestFailure, RunningVm, VmSpec } from '../backends/types.js';
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
      throw new MvmError(`${guest}'s agent did not answer within ${Number((timeoutMs / 1000).toFixed(1))} s${hint}`, 125, vm.consoleTail(20));
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

/** A KVM verdict is about this host boot, this VMM build and this guest kernel. */
export async function verdictKeyFor(backend: Backend, kernelSha256: string): Promise<VerdictKey> {
  const id = backend.vmmIdentity ? await backend.vmmIdentity() : undefined;
  return { bootId: hostBootId(), vmm: id ? `${backend.name} ${id.binary} ${id.size} ${id.mtimeMs}` : backend.name, kernelSha256 };
}

/** Plans the accelerator for booting `kernelSha256` on `backend`; says why when it has to emulate. */
export async function planBootAccel(backend: Backend, choice: AccelChoice, kernelSha256: string, log: (line: string) => void): Promise<AccelPlan> {
  const plan = await planAccel(choice, { verdictKey: () => verdictKeyFor(backend, kernelSha256) });
  if (!backend.capabilities().accels.includes(plan.accel)) {
    throw new MvmError(`the ${backend.name} backend needs KVM, and ${plan.tcgReason ?? 'it is not available'}: use --backend qemu`);
  }
  if (plan.tcgReason) warnTcg(plan.tcgReason, log);
  return plan;
}

function warnTcg(reason: string, log: (line: string) => void): void {
  if (process.env.MVM_NO_TCG_WARNING !== '1') log(tcgWarning(reason));
}

export interface BootOptions extends OpenAgentOptions {
  accel: AccelPlan;
  /** Called with each VMM as soon as it runs (the VM registry records its pid). */
  onVmmStarted: (vm: RunningVm) => Promise<void>;
  log: (line: string) => void;
}

export interface BootedVm {
  vm: RunningVm;
  session: AgentSession;
  accel: Accel;
}

/**
 * Starts `spec` under the planned accelerator and waits for its agent. On failure the VMM is killed
 * before the error is thrown; on success the caller owns the VM.
 */
export async function bootVm(backend: Backend, spec: Omit<VmSpec, 'accel'>, options: BootOptions): Promise<BootedVm> {
  const plan = options.accel;
  try {
    return await bootOnce(backend, spec, plan.accel, options).then(async (booted) => {
      if (plan.probe) await recordVerdict(plan.probe, true).catch(() => {});
      return booted;
    });
  } catch (error) {
    if (!(error instanceof GuestFailedError && error.failure.accelFailure)) throw error;
    if (plan.probe) await recordVerdict(plan.probe, false, error.failure.reason).catch(() => {});
    if (plan.choice === 'kvm') {
      throw new MvmError(`--accel kvm: KVM cannot run the guest on this host: ${error.failure.reason} (use --accel auto or tcg)`, 125, error.details);
    }
    warnTcg(`KVM cannot run the guest on this host (${error.failure.reason}; remembered until the host reboots or QEMU or the guest kernel changes)`, options.log);
    // The TCG boot reuses the VM directory: clear the first attempt's sockets.
    await Promise.all(['agent.sock', 'qmp.sock'].map((file) => rm(join(spec.runDir, file), { force: true })));
    return bootOnce(backend, spec, 'tcg', options);
  }
}

async function bootOnce(backend: Backend, spec: Omit<VmSpec, 'accel'>, accel: Accel, options: BootOptions): Promise<BootedVm> {
  const vm = await backend.start({ ...spec, accel }, options.signal);
  try {
    await options.onVmmStarted(vm);
    return { vm, session: await openAgentSession(vm, options), accel };
  } catch (error) {
    await vm.kill();
    throw error;
  }
}
