/**
 * The host side of a Firecracker guest's NIC. Firecracker has no user-mode network stack: the
 * guest's packets go to a TAP device, which only root (CAP_NET_ADMIN) can make, route and NAT. So
 * an admin makes one beforehand (`ip tuntap add NAME mode tap user $USER`, the host's address on it
 * GUEST_NET.gateway/24, NAT out and a resolver at GUEST_NET.resolver if the guest should resolve
 * names) and names it in MVM_FIRECRACKER_TAP. Only one process can open a TAP at a time, and every
 * guest has the same address, so such a NIC serves one VM at a time; a second one's PUT fails with
 * Firecracker's own error.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_NET } from '../../net/spec.js';
import type { NicSpec } from '../types.js';

/** `MVM_FIRECRACKER_TAP`; undefined when unset or empty. */
export function tapName(env: NodeJS.ProcessEnv): string | undefined {
  return env.MVM_FIRECRACKER_TAP || undefined;
}

/** Why Firecracker cannot give a guest `nic` on this host, in one line that names the fix; undefined when it can. */
export function tapUnavailable(nic: NicSpec, env: NodeJS.ProcessEnv): string | undefined {
  // An allowlist or a forward would need the host's firewall (root), not just a TAP.
  if (nic.restricted || nic.proxySocket || nic.forwards.length > 0) {
    return "--allow-host and -p need the qemu backend (Firecracker's TAP networking has no host-enforced allowlist or port forwards): use --backend qemu";
  }
  const name = tapName(env);
  if (!name) {
    return `--net user with Firecracker needs a TAP device: create one ('ip tuntap add mvmtap0 mode tap user $USER', with address ${GUEST_NET.gateway}/24 and NAT on the host) and set MVM_FIRECRACKER_TAP=mvmtap0; or use --backend qemu`;
  }
  // A name with a slash is no interface name, and would point elsewhere under /sys.
  const isName = !name.includes('/') && name !== '.' && name !== '..';
  if (!isName || !existsSync(join('/sys/class/net', name))) {
    return `MVM_FIRECRACKER_TAP=${name}: this host has no network device of that name: create it ('ip tuntap add ${name} mode tap user $USER') or set MVM_FIRECRACKER_TAP to one that exists; or use --backend qemu`;
  }
  return undefined;
}
