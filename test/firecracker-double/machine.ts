/**
 * What the Firecracker test double's API server asks of the VM behind it. The server (api-server.ts)
 * validates requests and keeps Firecracker's order rules; a Machine really runs the guest
 * (qemu-machine.ts: QEMU microvm). Every method rejects with an Error whose message becomes the
 * `fault_message` of a 400 answer.
 */

export interface DriveConfig {
  driveId: string;
  pathOnHost: string;
  isReadOnly: boolean;
  isRootDevice: boolean;
}

/** A guest NIC. The double never opens `hostDevName` (the test host has no TAP): the Machine gives the guest a network of its own. */
export interface NetworkInterfaceConfig {
  ifaceId: string;
  hostDevName: string;
  guestMac?: string;
}

export interface MachineConfig {
  vcpuCount: number;
  memSizeMib: number;
  kernelImagePath: string;
  initrdPath?: string;
  bootArgs: string;
  /** In the order they were first PUT. */
  drives: DriveConfig[];
  vsock?: { guestCid: number; udsPath: string };
  /** The double offers one NIC at most. */
  networkInterface?: NetworkInterfaceConfig;
  /** PUT /entropy was called: the guest gets a virtio-rng device. */
  entropy: boolean;
}

export interface SnapshotLoad {
  snapshotPath: string;
  memFilePath: string;
  /** From `vsock_override`. */
  vsockUdsPath?: string;
  /** From `network_overrides`: the snapshot's NIC `ifaceId` is now on `hostDevName`. */
  networkOverrides?: { ifaceId: string; hostDevName: string }[];
  resumeVm: boolean;
}

export interface Machine {
  /** InstanceStart: boots the guest. */
  start(config: MachineConfig): Promise<void>;
  pause(): Promise<void>;
  resume(): Promise<void>;
  /** Only called while paused. The VM stays paused. */
  createSnapshot(snapshotPath: string, memFilePath: string): Promise<void>;
  /** Only called on a fresh process, before any other configuration. */
  loadSnapshot(load: SnapshotLoad): Promise<void>;
  /** PATCH /drives/{id} after start or load: the drive's backing file changes. */
  updateDrive(driveId: string, pathOnHost: string): Promise<void>;
  sendCtrlAltDel(): Promise<void>;
  /** Settles when the guest has ended (power-off, reboot, crash); the double then exits, as Firecracker does. */
  readonly ended: Promise<void>;
}
