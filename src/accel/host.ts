import { accessSync, constants, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

/** What the host says about KVM without booting anything. */
export interface KvmHost {
  device: 'absent' | 'no-access' | 'present';
  /** Loaded KVM modules, e.g. `kvm_intel`, `kvm_pvm`. */
  modules: string[];
  /** Whether /proc/cpuinfo lists hardware virtualisation (vmx or svm). */
  cpuVirtualization: boolean;
  /**
   * Why KVM cannot run a stock guest kernel here, read from the host (a paravirtual KVM, no
   * hardware virtualisation), or undefined when nothing rules it out. Only a boot proves it works.
   */
  ruledOut?: string;
}

const KVM_MODULES = ['kvm_intel', 'kvm_amd', 'kvm_pvm'];

/** Inspects /dev/kvm, the loaded KVM modules and the CPU flags. `root` lets tests point at a fake tree. */
export function inspectKvmHost(root = '/'): KvmHost {
  const device = join(root, 'dev/kvm');
  let state: KvmHost['device'] = 'present';
  if (!existsSync(device)) state = 'absent';
  else {
    try {
      accessSync(device, constants.R_OK | constants.W_OK);
    } catch {
      state = 'no-access';
    }
  }
  const modules = KVM_MODULES.filter((name) => existsSync(join(root, 'sys/module', name)));
  let flags = '';
  try {
    flags = /^flags\s*:(.*)$/m.exec(readFileSync(join(root, 'proc/cpuinfo'), 'utf8'))?.[1] ?? '';
  } catch {
    // no cpuinfo: nothing to rule KVM out with
  }
  const cpuVirtualization = /\s(vmx|svm)(\s|$)/.test(` ${flags} `);
  let ruledOut: string | undefined;
  // kvm_pvm runs only guests built for PVM (out-of-tree patches): a stock kernel dies at its first privileged instruction.
  if (modules.includes('kvm_pvm')) ruledOut = '/dev/kvm is served by kvm_pvm, which runs only PVM-patched guest kernels';
  else if (state === 'present' && !cpuVirtualization) ruledOut = 'the CPU shows no hardware virtualisation (no vmx or svm flag)';
  return { device: state, modules, cpuVirtualization, ...(ruledOut ? { ruledOut } : {}) };
}

/** The Linux boot's unique id: a verdict about KVM holds until the host reboots. */
export function hostBootId(root = '/'): string {
  try {
    return readFileSync(join(root, 'proc/sys/kernel/random/boot_id'), 'utf8').trim();
  } catch {
    return 'unknown';
  }
}
