/**
 * A run's network, set up before its VM starts and closed after it ends: the NIC the backend gives
 * the guest, the kernel argument that configures it, the environment that points the command at
 * the allowlist proxy, and the proxy itself.
 */
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Backend, NicSpec } from '../backends/types.js';
import { MvmError } from '../errors.js';
import { AllowlistProxy, parseHostsFile } from '../net/proxy.js';
import { describeNetwork, guestIpKernelArg, proxyEnv, type NetworkPlan } from '../net/spec.js';

/** The most of MVM_NET_HOSTS that is read. */
const MAX_HOSTS_FILE_BYTES = 1 << 20;

export interface RunNetwork {
  nic: NicSpec;
  kernelArg: string;
  /** Under the command's own -e variables (theirs win). */
  env: Record<string, string>;
  /** Stops the proxy, if there is one; idempotent. */
  close(): Promise<void>;
}

/**
 * Checks that `backend` can give the guest this network, and starts the proxy an allowlist needs,
 * listening in the VM's directory. Throws an MvmError (nothing started) when it cannot.
 */
export async function openRunNetwork(plan: NetworkPlan, runDir: string, backend: Backend, io: { log: (line: string) => void; verbose: boolean }): Promise<RunNetwork> {
  const proxySocket = plan.allowHosts.length > 0 ? join(runDir, 'proxy.sock') : undefined;
  const nic: NicSpec = { restricted: plan.outbound === 'restricted', forwards: plan.forwards, ...(proxySocket ? { proxySocket } : {}) };
  const unavailable = backend.nicUnavailable(nic);
  if (unavailable) throw new MvmError(unavailable);
  if (io.verbose) io.log(`[net] ${describeNetwork(plan)}`);
  const proxy = proxySocket
    ? await AllowlistProxy.start({
        socketPath: proxySocket,
        allowHosts: plan.allowHosts,
        hosts: await hostsFromEnv(),
        onRefused: io.verbose ? io.log : () => {},
      })
    : undefined;
  let closed: Promise<void> | undefined;
  return {
    nic,
    kernelArg: guestIpKernelArg(plan),
    env: proxyEnv(plan),
    close: () => (closed ??= proxy?.close() ?? Promise.resolve()),
  };
}

/** MVM_NET_HOSTS: a hosts file whose names the proxy resolves before asking DNS. */
async function hostsFromEnv(): Promise<Map<string, string>> {
  const path = process.env.MVM_NET_HOSTS;
  if (!path) return new Map();
  try {
    if ((await stat(path)).size > MAX_HOSTS_FILE_BYTES) throw new MvmError(`MVM_NET_HOSTS=${path}: larger than 1 MiB`);
    return parseHostsFile(await readFile(path, 'utf8'));
  } catch (error) {
    if (error instanceof MvmError) throw error;
    throw new MvmError(`MVM_NET_HOSTS=${path}: cannot read it (${(error as Error).message})`);
  }
}
