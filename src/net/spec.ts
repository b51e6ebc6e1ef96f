/**
 * The guest's network as a run asks for it (`--net`, `--allow-host`, `-p`), checked before any VM
 * starts, and the addressing every backend gives a guest NIC. The addresses are QEMU user-mode
 * networking's defaults, so that the guest sees the same network whichever backend it runs on.
 */
import { isIP } from 'node:net';
import { MvmError } from '../errors.js';

export const NET_MODES = ['none', 'user'] as const;
export type NetMode = (typeof NET_MODES)[number];

export const GUEST_NET = {
  /** The guest kernel's name for its only NIC (the `ip=` argument's device; Firecracker's iface_id). */
  iface: 'eth0',
  /** QEMU's default for a first NIC; each VM has a network of its own, so guests never meet. */
  mac: '52:54:00:12:34:56',
  network: '10.0.2.0/24',
  guest: '10.0.2.15',
  netmask: '255.255.255.0',
  /** The host, as the guest reaches it (QEMU: the host's loopback). */
  gateway: '10.0.2.2',
  resolver: '10.0.2.3',
  /** Where a restricted guest finds the allowlist proxy: the network's only way out. */
  proxy: { address: '10.0.2.100', port: 3128 },
} as const;

/** A host name (or IP) the guest may reach through the proxy; no port: 80 and 443. */
export interface AllowedHost {
  /** Lower case; `*.example.com` also matches every name under example.com. */
  name: string;
  port?: number;
}

/** `-p [ADDRESS:]HOSTPORT:GUESTPORT`: host TCP connections to ADDRESS:HOSTPORT reach the guest's GUESTPORT. */
export interface PortForward {
  hostAddress: string;
  hostPort: number;
  guestPort: number;
}

/**
 * What the guest's NIC may do; absent: the guest has no NIC at all.
 * `open`: outbound TCP/UDP through the host's network stack.
 * `restricted`: nothing leaves but connections to the allowlist proxy (when `allowHosts` is not
 * empty) and the answers to port forwards.
 */
export interface NetworkPlan {
  outbound: 'open' | 'restricted';
  allowHosts: readonly AllowedHost[];
  forwards: readonly PortForward[];
}

export interface NetworkRequest {
  net?: NetMode;
  allowHosts?: readonly string[];
  publish?: readonly string[];
}

/**
 * The plan for a run's network options, on top of `fallback` (a template's default mode).
 * `--allow-host` limits outbound access to what it names, whatever `--net` says; `-p` alone gives
 * a NIC that only answers the forwards.
 */
export function planNetwork(request: NetworkRequest, fallback: NetMode = 'none'): NetworkPlan | undefined {
  const mode = request.net ?? fallback;
  if (!NET_MODES.includes(mode)) throw new MvmError(`--net: '${String(mode)}' is not one of ${NET_MODES.join(', ')}`);
  const allowHosts = (request.allowHosts ?? []).map(parseAllowedHost);
  const forwards = (request.publish ?? []).map(parsePortForward);
  const hostPorts = new Set<string>();
  for (const forward of forwards) {
    const key = `${forward.hostAddress}:${forward.hostPort}`;
    if (hostPorts.has(key)) throw new MvmError(`-p: host port ${key} is forwarded twice`);
    hostPorts.add(key);
  }
  if (allowHosts.length > 0) return { outbound: 'restricted', allowHosts, forwards };
  if (mode === 'user') return { outbound: 'open', allowHosts: [], forwards };
  if (forwards.length > 0) return { outbound: 'restricted', allowHosts: [], forwards };
  return undefined;
}

const HOST_NAME = /^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/;

/** `NAME[:PORT]`: a DNS name (optionally `*.`-prefixed) or an IPv4 address, and a port 1–65535. */
export function parseAllowedHost(spec: string): AllowedHost {
  if (typeof spec !== 'string') throw new MvmError('--allow-host: expected NAME[:PORT] strings');
  const match = /^([^:]+)(?::(\d+))?$/.exec(spec.trim());
  const name = match?.[1]?.toLowerCase();
  if (!match || !name || (!HOST_NAME.test(name) && isIP(name) !== 4) || name.length > 253) {
    throw new MvmError(`--allow-host '${spec}': not NAME[:PORT] (examples: pypi.org, api.example.com:8443, *.debian.org)`);
  }
  if (match[2] === undefined) return { name };
  return { name, port: portNumber(match[2], '--allow-host', spec) };
}

/** `[ADDRESS:]HOSTPORT:GUESTPORT`; the host side binds to 127.0.0.1 unless an address is named. */
export function parsePortForward(spec: string): PortForward {
  if (typeof spec !== 'string') throw new MvmError('-p: expected [ADDRESS:]HOSTPORT:GUESTPORT strings');
  const parts = spec.trim().split(':');
  if (parts.length < 2 || parts.length > 3) {
    throw new MvmError(`-p '${spec}': not [ADDRESS:]HOSTPORT:GUESTPORT (examples: 8080:80, 0.0.0.0:8080:80)`);
  }
  const hostAddress = parts.length === 3 ? parts[0]! : '127.0.0.1';
  if (isIP(hostAddress) !== 4) throw new MvmError(`-p '${spec}': ${hostAddress} is not an IPv4 address`);
  return {
    hostAddress,
    hostPort: portNumber(parts[parts.length - 2]!, '-p', spec),
    guestPort: portNumber(parts[parts.length - 1]!, '-p', spec),
  };
}

function portNumber(text: string, flag: string, spec: string): number {
  const port = /^\d{1,5}$/.test(text) ? Number(text) : NaN;
  if (!(port >= 1 && port <= 65535)) throw new MvmError(`${flag} '${spec}': ${text} is not a port (1-65535)`);
  return port;
}

/** Whether `allowed` lets the guest reach `name:port`. */
export function hostAllowed(allowed: readonly AllowedHost[], name: string, port: number): boolean {
  const wanted = name.toLowerCase().replace(/\.$/, '');
  return allowed.some((entry) => {
    const portOk = entry.port === undefined ? port === 80 || port === 443 : entry.port === port;
    if (!portOk) return false;
    if (entry.name.startsWith('*.')) return wanted.endsWith(entry.name.slice(1));
    return wanted === entry.name;
  });
}

/**
 * The kernel's own IP configuration (`ip=` with CONFIG_IP_PNP): address, route and, for open
 * networks, the resolver, which the image links /etc/resolv.conf to (/proc/net/pnp). A restricted
 * guest gets no resolver: its names are resolved by the proxy.
 */
export function guestIpKernelArg(plan: NetworkPlan): string {
  const resolver = plan.outbound === 'open' ? `:${GUEST_NET.resolver}` : '';
  return `ip=${GUEST_NET.guest}::${GUEST_NET.gateway}:${GUEST_NET.netmask}::${GUEST_NET.iface}:off${resolver}`;
}

/** The environment that points HTTP clients in a restricted guest at the proxy (the user's -e wins). */
export function proxyEnv(plan: NetworkPlan): Record<string, string> {
  if (plan.outbound !== 'restricted' || plan.allowHosts.length === 0) return {};
  const url = `http://${GUEST_NET.proxy.address}:${GUEST_NET.proxy.port}`;
  const noProxy = 'localhost,127.0.0.1';
  return { HTTP_PROXY: url, HTTPS_PROXY: url, http_proxy: url, https_proxy: url, NO_PROXY: noProxy, no_proxy: noProxy };
}

/** One line for `-v` and doctor. */
export function describeNetwork(plan: NetworkPlan | undefined): string {
  if (!plan) return 'none (no NIC)';
  const forwards = plan.forwards.map((f) => `${f.hostAddress}:${f.hostPort}->${f.guestPort}`).join(', ');
  const base = plan.outbound === 'open'
    ? 'user (outbound through the host)'
    : plan.allowHosts.length > 0
      ? `allowlist (${plan.allowHosts.map((h) => (h.port ? `${h.name}:${h.port}` : h.name)).join(', ')}) through the host's proxy`
      : 'no outbound access';
  return forwards ? `${base}; forwards ${forwards}` : base;
}
