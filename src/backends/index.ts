/**
 * The backend selector: each backend is a folder here, and a new one is a line in `BACKENDS` and
 * one in `autoBackend` where auto should pick it.
 */
import { inspectKvmHost, type KvmHost } from '../accel/index.js';
import { MvmError } from '../errors.js';
import { FirecrackerBackend, findFirecracker } from './firecracker/index.js';
import { QemuBackend } from './qemu/index.js';
import type { Backend } from './types.js';

const BACKENDS = {
  qemu: () => new QemuBackend(),
  firecracker: () => new FirecrackerBackend(),
} satisfies Record<Backend['name'], () => Backend>;

export type BackendChoice = 'auto' | Backend['name'];
export const BACKEND_CHOICES: readonly BackendChoice[] = ['auto', ...(Object.keys(BACKENDS) as Backend['name'][])];

/** `--backend` when given, else `MVM_BACKEND`, else auto. A bad `MVM_BACKEND` is one line, exit 125. */
export function backendChoice(flag: BackendChoice | undefined, env: NodeJS.ProcessEnv = process.env): BackendChoice {
  if (flag) return flag;
  const value = env.MVM_BACKEND;
  if (value === undefined || value === '') return 'auto';
  if ((BACKEND_CHOICES as readonly string[]).includes(value)) return value as BackendChoice;
  throw new MvmError(`MVM_BACKEND=${value} is not a backend: use ${BACKEND_CHOICES.join(', ')}`);
}

export interface BackendSelection {
  backend: Backend;
  /** Why this one, for `doctor` and `-v`. */
  reason: string;
}

export interface SelectOptions {
  env?: NodeJS.ProcessEnv;
  host?: KvmHost;
}

/**
 * auto: Firecracker where its binary is found and KVM can run the guest (as far as the host checks
 * can tell without a boot: /dev/kvm opens, and no paravirtual KVM or missing VMX/SVM rules it out),
 * QEMU otherwise. An explicit choice is taken as it is.
 */
export function chooseBackend(choice: BackendChoice, options: SelectOptions = {}): BackendSelection {
  if (choice !== 'auto') return { backend: BACKENDS[choice](), reason: 'chosen' };
  return autoBackend(options.env ?? process.env, options.host ?? inspectKvmHost());
}

function autoBackend(env: NodeJS.ProcessEnv, host: KvmHost): BackendSelection {
  const qemu = (why: string) => ({ backend: BACKENDS.qemu(), reason: `auto: QEMU, because ${why}` });
  if (!findFirecracker(env)) return qemu('no Firecracker binary was found (PATH, MVM_FIRECRACKER)');
  if (host.device === 'absent') return qemu('Firecracker needs KVM and /dev/kvm does not exist');
  if (host.device === 'no-access') return qemu('Firecracker needs KVM and /dev/kvm cannot be opened');
  if (host.ruledOut && env.MVM_KVM_PRECHECK !== '0') return qemu(`Firecracker needs KVM and ${host.ruledOut}`);
  return { backend: BACKENDS.firecracker(), reason: 'auto: Firecracker, found with a usable-looking KVM' };
}

export function selectBackend(choice: BackendChoice): Backend {
  return chooseBackend(choice).backend;
}

export type { Backend, BackendCapabilities, DriveSpec, GuestFailure, RunningVm, VmExit, VmSpec } from './types.js';
