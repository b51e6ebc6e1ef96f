import { accelChoice, type AccelChoice, inspectKvmHost, readVerdict, type VerdictKey } from '../accel/index.js';
import { backendChoice, chooseBackend, selectBackend } from '../backends/index.js';
import { findVhostDeviceVsock } from '../backends/qemu/index.js';
import { verdictKeyFor } from '../vm/index.js';
import { defaultImageStatus } from '../image/index.js';
import type { Check } from './checks.js';

export interface HostCheckOptions {
  /** Root of the /dev, /sys/module and /proc trees read (tests give a fake one). */
  hostRoot?: string;
  verdictDir?: string;
  env?: NodeJS.ProcessEnv;
  /** The key exec's next boot looks its verdict up by; undefined when it has none yet. */
  verdictKey?: () => Promise<VerdictKey | undefined>;
}

/** exec boots the current default image; one it still has to build has never been booted, so has no verdict. */
async function nextBootVerdictKey(): Promise<VerdictKey | undefined> {
  const status = await defaultImageStatus();
  if (!status.image || status.staleReasons.length > 0) return undefined;
  return verdictKeyFor(selectBackend('auto'), status.image.kernelSha256).catch(() => undefined);
}

function when(iso: string): string {
  return `${iso.slice(0, 16).replace('T', ' ')} UTC`;
}

const ABSENT_FIX = 'load kvm_intel/kvm_amd, or pass /dev/kvm into the container';
const NO_ACCESS_FIX = 'sudo usermod -aG kvm $USER, then log in again';

/**
 * KVM when a boot showed it works, TCG otherwise. TCG works wherever QEMU does, so only MVM_ACCEL
 * fails this check: a bad value, or `kvm` where there is no usable /dev/kvm.
 */
export async function checkAccelerator(options: HostCheckOptions = {}): Promise<Check> {
  const name = 'accelerator';
  const env = options.env ?? process.env;
  let choice: AccelChoice;
  try {
    choice = accelChoice(undefined, env);
  } catch (error) {
    return { name, status: 'fail', summary: (error as Error).message, fix: 'unset MVM_ACCEL, or set it to auto, kvm or tcg' };
  }
  if (choice === 'tcg') return { name, status: 'ok', summary: 'TCG chosen by MVM_ACCEL=tcg (software emulation, much slower than KVM)' };

  const host = inspectKvmHost(options.hostRoot);
  // With MVM_ACCEL=kvm exec refuses to fall back, so what is a warning under auto stops it.
  const fallback =
    choice === 'kvm'
      ? ({ status: 'fail', note: 'and MVM_ACCEL=kvm forbids falling back to TCG' } as const)
      : ({ status: 'warn', note: 'using TCG (software emulation, much slower)' } as const);
  if (host.device === 'absent') return { name, status: fallback.status, summary: `/dev/kvm absent; ${fallback.note}`, fix: ABSENT_FIX };
  if (host.device === 'no-access') return { name, status: fallback.status, summary: `no permission on /dev/kvm; ${fallback.note}`, fix: NO_ACCESS_FIX };

  const key = await (options.verdictKey ?? nextBootVerdictKey)();
  const verdict = key && (await readVerdict(key, options.verdictDir));
  if (verdict?.usable) return { name, status: 'ok', summary: `KVM usable (a boot under KVM worked on ${when(verdict.decidedAt)})` };
  const failedBoot = verdict && `${verdict.reason ?? 'a boot under KVM failed'} (found by a boot on ${when(verdict.decidedAt)})`;
  const modules = host.modules.length > 0 ? host.modules.join(', ') : 'no KVM module seen';
  if (choice === 'kvm') {
    const doubt = failedBoot ?? host.ruledOut;
    if (!doubt) return { name, status: 'ok', summary: `/dev/kvm present (${modules}); MVM_ACCEL=kvm uses it` };
    return { name, status: 'warn', summary: `/dev/kvm present but KVM likely cannot run the guest: ${doubt}; MVM_ACCEL=kvm insists on it`, fix: 'unset MVM_ACCEL, so that exec falls back to TCG' };
  }
  if (failedBoot) return { name, status: 'warn', summary: `/dev/kvm present but KVM cannot run the guest: ${failedBoot}; using TCG` };
  if (host.ruledOut && env.MVM_KVM_PRECHECK === '0') {
    return { name, status: 'warn', summary: `/dev/kvm present but likely unusable (${host.ruledOut}); MVM_KVM_PRECHECK=0, so the first exec tries KVM anyway` };
  }
  if (host.ruledOut) return { name, status: 'warn', summary: `/dev/kvm present but KVM cannot run the guest: ${host.ruledOut}; using TCG` };
  return { name, status: 'ok', summary: `/dev/kvm present (${modules}), not yet proven by a boot: the first exec tries KVM, falling back to TCG` };
}

/** QEMU's vsock device is optional: without it the agent is on the virtio-serial port. */
export function checkVhostDeviceVsock(env: NodeJS.ProcessEnv = process.env): Check {
  const name = 'vsock device';
  const found = findVhostDeviceVsock(env);
  if (env.MVM_QEMU_VSOCK === '0') return { name, status: 'ok', summary: 'MVM_QEMU_VSOCK=0: QEMU guests use the virtio-serial port' };
  if (found) return { name, status: 'ok', summary: `${found}: cold-booted QEMU guests use vsock, snapshotted ones the virtio-serial port` };
  return {
    name,
    status: 'warn',
    summary: 'vhost-device-vsock not found: QEMU guests use the virtio-serial port (works, without vsock)',
    fix: "install Debian's vhost-device-vsock (unstable; scripts/setup does), or set MVM_VHOST_DEVICE_VSOCK",
  };
}

/** Which backend exec would use (`--backend auto`, or MVM_BACKEND) and why. */
export function checkBackend(env: NodeJS.ProcessEnv = process.env): Check {
  const name = 'backend';
  try {
    const { backend, reason } = chooseBackend(backendChoice(undefined, env), { env });
    return { name, status: 'ok', summary: `${backend.name}: ${reason}${env.MVM_BACKEND ? ' (MVM_BACKEND)' : ''}` };
  } catch (error) {
    return { name, status: 'fail', summary: (error as Error).message, fix: 'unset MVM_BACKEND, or set it to auto, qemu or firecracker' };
  }
}
