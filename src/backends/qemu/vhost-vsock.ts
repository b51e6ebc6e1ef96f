/**
 * Real vsock for QEMU guests: Debian's `vhost-device-vsock` (rust-vmm) runs the device in a process
 * of its own, and QEMU's `vhost-user-vsock-device` hands it the guest's virtqueues (guest RAM is
 * shared with it through a memfd). The host side is the hybrid vsock socket Firecracker also
 * serves (../vsock/hybrid.ts). One device process per VM, so guests cannot reach each other.
 *
 * QEMU 7.2 cannot migrate a VM with this device ("vhost-user backend lacks
 * VHOST_USER_PROTOCOL_F_LOG_SHMFD"), so snapshotted and restored VMs keep the virtio-serial port.
 */
import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { MvmError } from '../../errors.js';
import { findExecutable } from '../../which.js';

/** The guest's vsock context id: each VM has its own device, so every guest may use the same one. */
const GUEST_CID = 3;
const DEVICE_START_TIMEOUT_MS = 5_000;
const MAX_STDERR_BYTES = 4096;

/** `MVM_VHOST_DEVICE_VSOCK`, else `vhost-device-vsock` on PATH; undefined when absent. */
export function findVhostDeviceVsock(env: NodeJS.ProcessEnv = process.env): string | undefined {
  return findExecutable(env.MVM_VHOST_DEVICE_VSOCK || 'vhost-device-vsock');
}

export interface VhostVsockOptions {
  binary: string;
  setpriv: string;
  /** The vhost-user control socket QEMU connects to. */
  controlSocket: string;
  /** The hybrid vsock socket host clients connect to. */
  udsPath: string;
  signal: AbortSignal;
}

export interface VhostVsockDevice {
  /** Kills the device process and waits for it to be gone. */
  kill(): Promise<void>;
}

/**
 * Starts the device and waits until its control socket exists (QEMU fails at start-up without it).
 * Like the VMM it gets a parent-death signal, so it dies with mvmctl even after SIGKILL.
 */
export async function startVhostVsock(options: VhostVsockOptions): Promise<VhostVsockDevice> {
  const child = spawn(
    options.setpriv,
    ['--pdeathsig', 'KILL', '--', options.binary, '--guest-cid', String(GUEST_CID), '--socket', options.controlSocket, '--uds-path', options.udsPath],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => {
    if (stderr.length < MAX_STDERR_BYTES) stderr += chunk.toString('utf8');
  });
  const gone = new Promise<void>((resolve) => {
    child.once('close', () => resolve());
    child.once('error', () => resolve());
  });
  let exited = false;
  void gone.then(() => (exited = true));
  const device = {
    kill: async () => {
      child.kill('SIGKILL');
      await gone;
    },
  };
  const deadline = Date.now() + DEVICE_START_TIMEOUT_MS;
  try {
    for (;;) {
      options.signal.throwIfAborted();
      if (await stat(options.controlSocket).then(() => true, () => false)) return device;
      if (exited) throw new MvmError(`vhost-device-vsock exited at start: ${stderr.trim().split('\n').pop() || 'no message'}`);
      if (Date.now() > deadline) throw new MvmError(`vhost-device-vsock did not create its socket within ${DEVICE_START_TIMEOUT_MS / 1000} s`);
      await sleep(5, undefined, { signal: options.signal });
    }
  } catch (error) {
    await device.kill();
    throw error;
  }
}
