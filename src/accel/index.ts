/**
 * Choosing the accelerator: KVM only where KVM can really run our guest, TCG (software emulation)
 * everywhere else. `/dev/kvm` opening proves nothing (a paravirtual KVM, nested virtualisation that
 * half works, a device node without the module behind it): a boot is the authority, and its verdict
 * is remembered (verdict.ts). Cheap host checks (host.ts) may rule KVM out before any boot.
 */
import { MvmError } from '../errors.js';
import { inspectKvmHost, type KvmHost } from './host.js';
import { readVerdict, type VerdictKey } from './verdict.js';

export type Accel = 'kvm' | 'tcg';
export type AccelChoice = 'auto' | Accel;
export const ACCEL_CHOICES: readonly AccelChoice[] = ['auto', 'kvm', 'tcg'];

export { hostBootId, inspectKvmHost, type KvmHost } from './host.js';
export { readVerdict, recordVerdict, verdictDir, type KvmVerdict, type VerdictKey } from './verdict.js';

/** `--accel` when given, else `MVM_ACCEL`, else auto. A bad `MVM_ACCEL` is one line, exit 125. */
export function accelChoice(flag: AccelChoice | undefined, env: NodeJS.ProcessEnv = process.env): AccelChoice {
  if (flag) return flag;
  const value = env.MVM_ACCEL;
  if (value === undefined || value === '') return 'auto';
  if ((ACCEL_CHOICES as readonly string[]).includes(value)) return value as AccelChoice;
  throw new MvmError(`MVM_ACCEL=${value} is not an accelerator: use auto, kvm or tcg`);
}

export interface AccelPlan {
  choice: AccelChoice;
  accel: Accel;
  /**
   * Boot under KVM and record what happens (usable or not) as the verdict for this key. With
   * choice `auto` a KVM failure during boot then continues under TCG in the same run.
   */
  probe?: VerdictKey;
  /** Why this run emulates the CPU although the user did not ask for TCG: one warning line. */
  tcgReason?: string;
}

export interface PlanOptions {
  /** Identifies host boot, VMM and guest kernel; only computed when a verdict is needed. */
  verdictKey: () => Promise<VerdictKey>;
  host?: KvmHost;
  env?: NodeJS.ProcessEnv;
  verdictDir?: string;
}

/** Decides the accelerator for one boot. Costs no boot: a probe, when needed, is the boot itself. */
export async function planAccel(choice: AccelChoice, options: PlanOptions): Promise<AccelPlan> {
  if (choice === 'tcg') return { choice, accel: 'tcg' };
  const host = options.host ?? inspectKvmHost();
  const env = options.env ?? process.env;
  if (host.device !== 'present') {
    const why =
      host.device === 'absent'
        ? '/dev/kvm does not exist (no KVM module loaded, or not passed into this container)'
        : `no permission to open /dev/kvm (add yourself to its group: sudo usermod -aG kvm $USER, then log in again)`;
    if (choice === 'kvm') throw new MvmError(`--accel kvm: ${why}; or use --accel tcg`);
    return { choice, accel: 'tcg', tcgReason: why };
  }
  const key = await options.verdictKey();
  const verdict = await readVerdict(key, options.verdictDir);
  // An explicit --accel kvm always tries, and what it finds replaces the remembered verdict.
  if (choice === 'kvm') return { choice, accel: 'kvm', probe: key };
  if (verdict) {
    return verdict.usable
      ? { choice, accel: 'kvm' }
      : { choice, accel: 'tcg', tcgReason: `KVM cannot run the guest here: ${verdict.reason ?? 'a boot under KVM failed'} (found by a boot on ${verdict.decidedAt})` };
  }
  if (host.ruledOut && env.MVM_KVM_PRECHECK !== '0') return { choice, accel: 'tcg', tcgReason: host.ruledOut };
  return { choice, accel: 'kvm', probe: key };
}

/** The warning for a run that emulates the CPU, naming why and how to skip the check. */
export function tcgWarning(reason: string): string {
  return `${reason}: emulating the CPU with TCG, which is much slower than KVM (--accel tcg or MVM_ACCEL=tcg skips this check; MVM_NO_TCG_WARNING=1 hides this line)`;
}
