/** The API calls that configure and boot a Firecracker VM from a VmSpec, in the order Firecracker takes them. */
import { join } from 'node:path';
import { GUEST_NET } from '../../net/spec.js';
import { AGENT_VSOCK_PORT } from '../../protocol/constants.js';
import { driveSerial, ROOT_DRIVE_SERIAL } from '../drives.js';
import { SNAPSHOT_FILES, type VmSpec } from '../types.js';

/** The guest's vsock context id; each VM has its own device, so every guest may use the same one. */
export const GUEST_CID = 3;

export function apiSocketPath(runDir: string): string {
  return join(runDir, 'firecracker.sock');
}

export function vsockSocketPath(runDir: string): string {
  return join(runDir, 'vsock.sock');
}

export interface ApiCall {
  method: 'PUT' | 'PATCH';
  path: string;
  body: unknown;
}

/** A drive as the guest sees it: its id is the serial the guest looks it up by (/sys/block/vdX/serial). */
export interface FirecrackerDrive {
  id: string;
  path: string;
  readOnly: boolean;
}

export function drivesOf(spec: VmSpec, rootPath: string | undefined): FirecrackerDrive[] {
  return [
    ...(spec.rootDrive && rootPath ? [{ id: ROOT_DRIVE_SERIAL, path: rootPath, readOnly: false }] : []),
    ...spec.drives.map((drive, index) => ({ id: driveSerial(index), path: drive.path, readOnly: drive.readOnly })),
  ];
}

export function bootArgs(spec: VmSpec): string {
  return [
    'console=ttyS0',
    // Firecracker ends when the guest resets the CPU through the keyboard controller: the agent's
    // power-off (a reboot) and a panic both end the VMM.
    'reboot=k',
    'panic=1',
    'pci=off',
    `mvm.agent=vsock:${AGENT_VSOCK_PORT}`,
    ...spec.kernelArgs,
  ].join(' ');
}

/** The TAP device a spec's NIC is given; a spec without one needs none. */
function nicTap(spec: VmSpec, tap: string | undefined): string | undefined {
  if (spec.nic && !tap) throw new Error(`${spec.name}: a NIC needs the TAP device it is given`);
  return spec.nic ? tap : undefined;
}

/**
 * Everything up to and including InstanceStart. `rootPath` is the root drive the VM writes to,
 * `tap` the host device of the spec's NIC (tap.ts).
 */
export function bootCalls(spec: VmSpec, rootPath: string | undefined, tap?: string): ApiCall[] {
  const nicDevice = nicTap(spec, tap);
  return [
    { method: 'PUT', path: '/machine-config', body: { vcpu_count: spec.cpus, mem_size_mib: spec.memoryMiB } },
    {
      method: 'PUT',
      path: '/boot-source',
      body: { kernel_image_path: spec.kernel, ...(spec.initrd ? { initrd_path: spec.initrd } : {}), boot_args: bootArgs(spec) },
    },
    ...drivesOf(spec, rootPath).map((drive) => ({
      method: 'PUT' as const,
      path: `/drives/${drive.id}`,
      body: { drive_id: drive.id, path_on_host: drive.path, is_root_device: false, is_read_only: drive.readOnly },
    })),
    ...(nicDevice
      ? [{ method: 'PUT' as const, path: `/network-interfaces/${GUEST_NET.iface}`, body: { iface_id: GUEST_NET.iface, host_dev_name: nicDevice, guest_mac: GUEST_NET.mac } }]
      : []),
    { method: 'PUT', path: '/vsock', body: { guest_cid: GUEST_CID, uds_path: vsockSocketPath(spec.runDir) } },
    // Host entropy for the guest's CRNG, as QEMU's virtio-rng gives it.
    { method: 'PUT', path: '/entropy', body: {} },
    { method: 'PUT', path: '/actions', body: { action_type: 'InstanceStart' } },
  ];
}

/**
 * A restore on a fresh process: load paused, with the vsock on this VM's socket and the NIC on this
 * host's TAP (the snapshot names the captured VM's); point every drive at this run's file; then
 * resume. The vsock device resets on load, so the agent is reached by a new connection.
 */
export function restoreCalls(spec: VmSpec & { snapshot: { dir: string } }, rootPath: string | undefined, tap?: string): ApiCall[] {
  const nicDevice = nicTap(spec, tap);
  return [
    {
      method: 'PUT',
      path: '/snapshot/load',
      body: {
        snapshot_path: join(spec.snapshot.dir, SNAPSHOT_FILES.state),
        mem_backend: { backend_type: 'File', backend_path: join(spec.snapshot.dir, SNAPSHOT_FILES.memory) },
        vsock_override: { uds_path: vsockSocketPath(spec.runDir) },
        ...(nicDevice ? { network_overrides: [{ iface_id: GUEST_NET.iface, host_dev_name: nicDevice }] } : {}),
        resume_vm: false,
      },
    },
    ...drivesOf(spec, rootPath).map((drive) => ({
      method: 'PATCH' as const,
      path: `/drives/${drive.id}`,
      body: { drive_id: drive.id, path_on_host: drive.path },
    })),
    { method: 'PATCH', path: '/vm', body: { state: 'Resumed' } },
  ];
}

/** Pause, then a full snapshot into the capture directory; the VM stays paused. */
export function snapshotCalls(dir: string): ApiCall[] {
  return [
    { method: 'PATCH', path: '/vm', body: { state: 'Paused' } },
    {
      method: 'PUT',
      path: '/snapshot/create',
      body: { snapshot_type: 'Full', snapshot_path: join(dir, SNAPSHOT_FILES.state), mem_file_path: join(dir, SNAPSHOT_FILES.memory) },
    },
  ];
}
