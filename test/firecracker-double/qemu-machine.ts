/**
 * The guest behind the Firecracker test double: QEMU microvm, started through mvmctl's own QEMU
 * backend, under TCG unless MVM_FC_DOUBLE_ACCEL=kvm (the double stands for a Firecracker on a host
 * where KVM works, which these machines are not). MVM_FC_DOUBLE_VSOCK chooses how the vsock
 * `uds_path` the API gave is served:
 *  - `bridge` (default): the guest's agent is on a virtio-serial port, and the double answers
 *    Firecracker's `CONNECT <port>` with `OK` itself and relays the bytes: a test tool's stand-in
 *    for vsock, not vsock. Guest RAM lives in a file, so snapshot/create and snapshot/load work
 *    through QEMU's migration.
 *  - `vhost-user`: real vsock, vhost-device-vsock serving the guest's vsock at `uds_path`. QEMU 7.2
 *    cannot migrate such a VM, so snapshot/create and snapshot/load answer an error.
 * A NIC is QEMU's user-mode networking (the backend's open `nic`: `-netdev user,net=10.0.2.0/24`
 * and a virtio-net device with MAC 52:54:00:12:34:56, the only guest_mac the API server takes), not
 * the TAP the API named, which the test host does not have and the double never opens: the double
 * checks the API calls, QEMU's slirp stands in for the TAP. A restored QEMU gets the same netdev
 * and device, as its migration stream needs.
 */
import { copyFile, mkdir, readFile, rename, rm, symlink, unlink, writeFile } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { hybridVsockPath } from '../../src/backends/qemu/args.js';
import { QemuBackend } from '../../src/backends/qemu/index.js';
import { SNAPSHOT_FILES, type RunningVm, type VmSpec } from '../../src/backends/types.js';
import { driveSerial, ROOT_DRIVE_SERIAL } from '../../src/backends/drives.js';
import type { DriveConfig, Machine, MachineConfig, SnapshotLoad } from './machine.js';

/** Boot arguments QEMU's backend sets itself, in its own way. */
const FIRECRACKER_ONLY_ARGS = /^(console|reboot|panic|pci|mvm\.agent)=/;
const SIDE_CAR = '.double.json';
const NO_SNAPSHOT_ON_VSOCK = 'the test double cannot snapshot or restore a guest on vhost-user vsock (QEMU 7.2 cannot migrate it): run it with MVM_FC_DOUBLE_VSOCK=bridge';

type VsockMode = 'bridge' | 'vhost-user';

function vsockMode(): VsockMode {
  const mode = process.env.MVM_FC_DOUBLE_VSOCK || 'bridge';
  if (mode !== 'bridge' && mode !== 'vhost-user') throw new Error(`MVM_FC_DOUBLE_VSOCK=${mode}: use bridge or vhost-user`);
  return mode;
}

export class QemuMachine implements Machine {
  readonly ended: Promise<void>;
  private endNow!: () => void;
  private vm?: RunningVm;
  private bridge?: Server;
  private pendingLoad?: { load: SnapshotLoad; config: MachineConfig };
  private readonly backend = new QemuBackend();
  private readonly abort = new AbortController();
  private config?: MachineConfig;
  /** Like Firecracker's, a VM that was snapshotted stays (paused) until the process is killed. */
  private snapshotTaken = false;
  private readonly mode = vsockMode();

  constructor(private readonly name: string, private readonly workDir: string) {
    this.ended = new Promise((resolve) => (this.endNow = resolve));
  }

  /** With the bridge, every VM may be snapshotted later, so its RAM is in a file from the start. */
  async start(config: MachineConfig): Promise<void> {
    await this.boot(config, this.mode === 'bridge' ? { mode: 'capture', dir: this.workDir } : undefined);
  }

  /** Pausing takes effect when the snapshot is written (QEMU stops the guest for its migration). */
  async pause(): Promise<void> {}

  async resume(): Promise<void> {
    if (!this.pendingLoad) return;
    const { load, config } = this.pendingLoad;
    this.pendingLoad = undefined;
    await this.restore(load, config);
  }

  async createSnapshot(snapshotPath: string, memFilePath: string): Promise<void> {
    if (this.mode === 'vhost-user') throw new Error(NO_SNAPSHOT_ON_VSOCK);
    if (!this.vm?.saveSnapshot || !this.config) throw new Error('the test double has no running guest to snapshot');
    this.snapshotTaken = true;
    await this.vm.saveSnapshot(this.abort.signal);
    await moveFile(join(this.workDir, SNAPSHOT_FILES.state), snapshotPath);
    await moveFile(join(this.workDir, SNAPSHOT_FILES.memory), memFilePath);
    // Firecracker's snapshot holds the VM's configuration; QEMU's migration stream does not.
    await writeFile(snapshotPath + SIDE_CAR, JSON.stringify(this.config));
  }

  async loadSnapshot(load: SnapshotLoad): Promise<void> {
    if (this.mode === 'vhost-user') throw new Error(NO_SNAPSHOT_ON_VSOCK);
    const config = JSON.parse(await readFile(load.snapshotPath + SIDE_CAR, 'utf8')) as MachineConfig;
    if (load.vsockUdsPath && config.vsock) config.vsock = { ...config.vsock, udsPath: load.vsockUdsPath };
    for (const override of load.networkOverrides ?? []) {
      if (config.networkInterface?.ifaceId !== override.ifaceId) throw new Error(`the snapshot has no network interface ${override.ifaceId} to override`);
      config.networkInterface.hostDevName = override.hostDevName;
    }
    if (load.resumeVm) return this.restore(load, config);
    this.pendingLoad = { load, config };
  }

  async updateDrive(driveId: string, pathOnHost: string): Promise<void> {
    const drive = this.pendingLoad?.config.drives.find((candidate) => candidate.driveId === driveId);
    if (!drive) throw new Error(`the test double can change drive ${driveId} only between snapshot/load and resume`);
    drive.pathOnHost = pathOnHost;
  }

  /** The guest is taken down as one that obeyed Ctrl-Alt-Del would be. */
  async sendCtrlAltDel(): Promise<void> {
    await this.vm?.kill();
  }

  private async restore(load: SnapshotLoad, config: MachineConfig): Promise<void> {
    const dir = join(this.workDir, 'restore');
    await mkdir(dir, { recursive: true });
    await symlink(load.snapshotPath, join(dir, SNAPSHOT_FILES.state));
    await symlink(load.memFilePath, join(dir, SNAPSHOT_FILES.memory));
    await this.boot(config, { mode: 'restore', dir });
  }

  private async boot(config: MachineConfig, snapshot: VmSpec['snapshot']): Promise<void> {
    this.config = config;
    const spec: VmSpec = {
      name: this.name,
      runDir: this.workDir,
      kernel: config.kernelImagePath,
      ...(config.initrdPath ? { initrd: config.initrdPath } : {}),
      kernelArgs: config.bootArgs.split(/\s+/).filter((arg) => arg && !FIRECRACKER_ONLY_ARGS.test(arg)),
      accel: process.env.MVM_FC_DOUBLE_ACCEL === 'kvm' ? 'kvm' : 'tcg',
      cpus: config.vcpuCount,
      memoryMiB: config.memSizeMib,
      ...drivesFor(config.drives),
      ...(snapshot ? { snapshot } : {}),
      ...(config.networkInterface ? { nic: { restricted: false, forwards: [] } } : {}),
      onConsoleLine: (line) => process.stdout.write(line + '\n'),
    };
    const vm = await this.backend.start(spec, this.abort.signal);
    this.vm = vm;
    void vm.exited.then(() => {
      if (!this.snapshotTaken) this.endNow();
    });
    if (!config.vsock) return;
    if (this.mode === 'bridge') {
      this.bridge = await serveBridge(config.vsock.udsPath, vm, this.abort.signal);
      return;
    }
    if (!vm.agentChannel.startsWith('vsock')) throw new Error('MVM_FC_DOUBLE_VSOCK=vhost-user needs vhost-device-vsock (see scripts/setup)');
    // The device serves the guest's vsock in the QEMU VM's directory; the API named another path.
    await rm(config.vsock.udsPath, { force: true });
    await symlink(hybridVsockPath(this.workDir), config.vsock.udsPath);
  }

  async stop(): Promise<void> {
    this.abort.abort();
    this.bridge?.close();
    await this.vm?.kill();
  }
}

/** The backend gives drives serials by position: the root drive, then mvm0, mvm1… in order. */
function drivesFor(drives: readonly DriveConfig[]): Pick<VmSpec, 'drives' | 'rootDrive'> {
  const root = drives.find((drive) => drive.driveId === ROOT_DRIVE_SERIAL);
  const others = drives.filter((drive) => drive !== root);
  others.forEach((drive, index) => {
    if (drive.driveId !== driveSerial(index)) throw new Error(`the test double maps drives by position: expected drive id ${driveSerial(index)}, got ${drive.driveId}`);
  });
  return {
    drives: others.map((drive) => ({ path: drive.pathOnHost, readOnly: drive.isReadOnly })),
    ...(root ? { rootDrive: { path: root.pathOnHost, copyOnWrite: false } } : {}),
  };
}

async function moveFile(from: string, to: string): Promise<void> {
  await rename(from, to).catch(async (error: NodeJS.ErrnoException) => {
    if (error.code !== 'EXDEV') throw error;
    await copyFile(from, to);
    await unlink(from);
  });
}

/** Serves the hybrid vsock protocol on `udsPath`, relaying each accepted connection to the agent's port. */
async function serveBridge(udsPath: string, vm: RunningVm, signal: AbortSignal): Promise<Server> {
  await rm(udsPath, { force: true });
  const server = createServer((client) => void relay(client, vm, signal));
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(udsPath, resolve));
  void vm.exited.then(() => server.close());
  return server;
}

async function relay(client: Socket, vm: RunningVm, signal: AbortSignal): Promise<void> {
  client.on('error', () => {});
  const line = await readConnectLine(client);
  const match = line && /^CONNECT (\d+)\n/.exec(line.toString('latin1'));
  if (!match) return void client.destroy();
  const agent = await vm.connectAgent(signal).catch(() => undefined);
  if (!agent) return void client.destroy();
  client.write(`OK ${1_000_000 + Number(match[1])}\n`);
  const rest = line.subarray(match[0].length);
  if (rest.length > 0) agent.write(rest);
  agent.on('error', () => client.destroy());
  await Promise.all([pipeline(client, agent).catch(() => {}), pipeline(agent, client).catch(() => {})]);
}

/** Reads up to the first newline (at most 32 bytes) and leaves the socket paused for the relay. */
function readConnectLine(client: Socket): Promise<Buffer | undefined> {
  return new Promise((resolve) => {
    let received = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      if (received.includes(0x0a) || received.length > 32) done(received);
    };
    const done = (value: Buffer | undefined) => {
      client.off('data', onData);
      client.off('close', onClose);
      client.pause();
      resolve(value);
    };
    const onClose = () => done(undefined);
    client.on('data', onData);
    client.once('close', onClose);
  });
}
