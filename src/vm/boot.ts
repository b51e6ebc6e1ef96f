/**
 * Starting a VM until its agent answers, with the accelerator's fallback: a boot under KVM whose
 * VMM reports that KVM cannot run the guest is killed at once, the verdict is remembered, and (with
 * `--accel auto`) the same run goes on under TCG.
 */
import { hostBootId, planAccel, recordVerdict, tcgWarning, type Accel, type AccelChoice, type AccelPlan, type VerdictKey } from '../accel/index.js';
import type { Backend, RunningVm, VmSpec } from '../backends/types.js';
import { MvmError } from '../errors.js';
import type { AgentSession } from '../protocol/index.js';
import { GuestFailedError, openAgentSession, type OpenAgentOptions } from './agent.js';
import type { OwnedVm } from './owned.js';

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
  log: (line: string) => void;
}

export interface BootedVm {
  vm: RunningVm;
  session: AgentSession;
  accel: Accel;
}

/**
 * Boots `spec` in `owned` under the planned accelerator and waits for its agent. On failure the
 * VMM is killed before the error is thrown; on success the caller owns the VM.
 */
export async function bootVm(owned: OwnedVm, spec: Omit<VmSpec, 'accel' | 'name' | 'runDir'>, options: BootOptions): Promise<BootedVm> {
  const plan = options.accel;
  try {
    const booted = await bootOnce(owned, spec, plan.accel, options);
    if (plan.probe) await recordVerdict(plan.probe, true).catch(() => {});
    return booted;
  } catch (error) {
    if (!(error instanceof GuestFailedError && error.failure.accelFailure)) throw error;
    if (plan.probe) await recordVerdict(plan.probe, false, error.failure.reason).catch(() => {});
    if (plan.choice === 'kvm') {
      throw new MvmError(`--accel kvm: KVM cannot run the guest on this host: ${error.failure.reason} (use --accel auto or tcg)`, 125, error.details);
    }
    warnTcg(`KVM cannot run the guest on this host (${error.failure.reason}; remembered until the host reboots or QEMU or the guest kernel changes)`, options.log);
    return bootOnce(owned, spec, 'tcg', options);
  }
}

async function bootOnce(owned: OwnedVm, spec: Omit<VmSpec, 'accel' | 'name' | 'runDir'>, accel: Accel, options: BootOptions): Promise<BootedVm> {
  const vm = await owned.start({ ...spec, accel }, options.signal);
  try {
    return { vm, session: await openAgentSession(vm, options), accel };
  } catch (error) {
    await vm.kill();
    throw error;
  }
}
