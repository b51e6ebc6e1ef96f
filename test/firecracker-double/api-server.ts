/**
 * The Firecracker test double's API: Firecracker's HTTP API on a unix socket. Every request is
 * checked against Firecracker's OpenAPI file (openapi.ts) and Firecracker's order rules (pre-boot
 * configuration, start, pause, snapshot) before it reaches the Machine, so a client that works
 * against the double does not lean on anything Firecracker would refuse. What the double cannot do
 * (balloon, logger, metrics, a second NIC, ...) is refused with a 400 that says so, never faked.
 */
import { constants } from 'node:fs';
import { access } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { GUEST_NET } from '../../src/net/spec.js';
import type { DriveConfig, Machine, MachineConfig, NetworkInterfaceConfig } from './machine.js';
import { closeServer, fault, listen, readBody, send, serializer } from './http.js';
import { decodeBody, deserializeError, loadApiSpec, matchOperation, type ApiSpec, type MatchedOperation } from './openapi.js';

export interface ApiServerOptions {
  /** The instance id GET / reports (Firecracker's --id). */
  id?: string;
}

export interface ApiServer {
  /** Stops answering, drops open connections and removes the socket file. */
  close(): Promise<void>;
}

/** What Firecracker passes the kernel when PUT /boot-source has no boot_args. */
const defaultBootArgs = 'reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce';
const afterStart = 'The requested operation is not supported after starting the microVM.';
const beforeStart = 'The requested operation is not supported before starting the microVM.';
const afterFailure = 'An earlier InstanceStart or snapshot load failed; start a new test double process.';

type Phase = 'not-started' | 'running' | 'paused' | 'failed';
type Reply = { status: 200; body: unknown } | { status: 204 };
const noContent: Reply = { status: 204 };

/** Request bodies as the schema has already checked them (openapi.ts drops nulls, so optional means absent). */
interface MachineConfigBody { vcpu_count: number; mem_size_mib: number; smt?: boolean; cpu_template?: string; track_dirty_pages?: boolean; huge_pages?: string }
interface BootSourceBody { kernel_image_path: string; initrd_path?: string; boot_args?: string }
interface DriveBody { drive_id: string; is_root_device: boolean; path_on_host?: string; is_read_only?: boolean; partuuid?: string; socket?: string }
interface PartialDriveBody { drive_id: string; path_on_host?: string; rate_limiter?: unknown }
interface VsockBody { guest_cid: number; uds_path: string }
interface NetworkInterfaceBody { iface_id: string; host_dev_name: string; guest_mac?: string; mtu?: number }
interface SnapshotCreateBody { snapshot_path: string; mem_file_path: string; snapshot_type?: 'Full' | 'Diff' }
interface SnapshotLoadBody {
  snapshot_path: string;
  mem_file_path?: string;
  mem_backend?: { backend_type: 'File' | 'Uffd'; backend_path: string };
  resume_vm?: boolean;
  vsock_override?: { uds_path: string };
  network_overrides?: { iface_id: string; host_dev_name: string }[];
  clock_realtime?: boolean;
}

function unsupported(what: string): Error {
  return new Error(`${what} is not supported by the test double.`);
}

/** Firecracker's checked_id: resource ids in paths are alphanumeric and underscores. */
function checkIds(params: Record<string, string>): void {
  for (const id of Object.values(params)) {
    if (!/^\w+$/.test(id)) throw new Error('API Resource IDs can only contain alphanumeric characters and underscores.');
  }
}

/** Firecracker opens these files when they are configured, so a bad path fails the PUT, not the start. */
async function checkOpenable(path: string, writable: boolean, what: string): Promise<void> {
  try {
    await access(path, writable ? constants.R_OK | constants.W_OK : constants.R_OK);
  } catch (err) {
    throw new Error(`${what}: ${(err as Error).message}`);
  }
}

/** One Firecracker process's state, as the API sees it. */
class FirecrackerDouble {
  private phase: Phase = 'not-started';
  /** A boot-specific resource was configured: snapshot load is no longer allowed. */
  private configured = false;
  private fromSnapshot = false;
  private vcpuCount = 1;
  private memSizeMib = 128;
  private trackDirtyPages = false;
  private bootSource: { kernelImagePath: string; initrdPath?: string; bootArgs: string } | undefined;
  private readonly drives: DriveConfig[] = [];
  private vsock: { guestCid: number; udsPath: string } | undefined;
  private networkInterface: NetworkInterfaceConfig | undefined;
  private entropy = false;

  constructor(
    private readonly machine: Machine,
    private readonly id: string,
    private readonly version: string,
  ) {}

  async dispatch(op: MatchedOperation, body: unknown): Promise<Reply> {
    checkIds(op.params);
    switch (op.operationId) {
      case 'describeInstance':
        return { status: 200, body: this.instanceInfo() };
      case 'getFirecrackerVersion':
        return { status: 200, body: { firecracker_version: this.version } };
      case 'getMachineConfiguration':
        return { status: 200, body: this.machineConfiguration() };
      case 'putMachineConfiguration':
        return this.putMachineConfig(body as MachineConfigBody);
      case 'putGuestBootSource':
        return this.putBootSource(body as BootSourceBody);
      case 'putGuestDriveByID':
        return this.putDrive(op.params.drive_id, body as DriveBody);
      case 'patchGuestDriveByID':
        return this.patchDrive(op.params.drive_id, body as PartialDriveBody);
      case 'putGuestVsock':
        return this.putVsock(body as VsockBody);
      case 'putGuestNetworkInterfaceByID':
        return this.putNetworkInterface(op.params.iface_id, body as NetworkInterfaceBody);
      case 'putEntropyDevice':
        this.beginConfiguring();
        this.entropy = true;
        return noContent;
      case 'createSyncAction':
        return this.action((body as { action_type: string }).action_type);
      case 'patchVm':
        return this.patchVm((body as { state: 'Paused' | 'Resumed' }).state);
      case 'createSnapshot':
        return this.createSnapshot(body as SnapshotCreateBody);
      case 'loadSnapshot':
        return this.loadSnapshot(body as SnapshotLoadBody);
      default:
        throw unsupported(`${op.method} ${op.template}`);
    }
  }

  private instanceInfo(): unknown {
    const state = { 'not-started': 'Not started', failed: 'Not started', running: 'Running', paused: 'Paused' }[this.phase];
    return { id: this.id, state, vmm_version: this.version, app_name: 'Firecracker' };
  }

  private machineConfiguration(): unknown {
    return { vcpu_count: this.vcpuCount, mem_size_mib: this.memSizeMib, smt: false, track_dirty_pages: this.trackDirtyPages, huge_pages: 'None' };
  }

  private requireNotStarted(): void {
    if (this.phase === 'failed') throw new Error(afterFailure);
    if (this.phase !== 'not-started') throw new Error(afterStart);
  }

  private requireStarted(): void {
    if (this.phase === 'failed') throw new Error(afterFailure);
    if (this.phase === 'not-started') throw new Error(beforeStart);
  }

  /** Firecracker marks the boot path taken as soon as a pre-boot configuration call reaches the VMM. */
  private beginConfiguring(): void {
    this.requireNotStarted();
    this.configured = true;
  }

  private putMachineConfig(body: MachineConfigBody): Reply {
    this.beginConfiguring();
    if (body.smt === true) throw unsupported('smt');
    if (body.cpu_template !== undefined && body.cpu_template !== 'None') throw unsupported('cpu_template');
    if (body.huge_pages === '2M') throw unsupported('huge_pages');
    if (body.mem_size_mib < 1) throw new Error('The memory size (MiB) is either 0, or not a multiple of the configured page size.');
    this.vcpuCount = body.vcpu_count;
    this.memSizeMib = body.mem_size_mib;
    this.trackDirtyPages = body.track_dirty_pages ?? false;
    return noContent;
  }

  private async putBootSource(body: BootSourceBody): Promise<Reply> {
    this.beginConfiguring();
    await checkOpenable(body.kernel_image_path, false, 'The kernel file cannot be opened');
    if (body.initrd_path !== undefined) {
      await checkOpenable(body.initrd_path, false, 'The initrd file cannot be opened due to invalid path or invalid permissions');
    }
    this.bootSource = {
      kernelImagePath: body.kernel_image_path,
      ...(body.initrd_path !== undefined && { initrdPath: body.initrd_path }),
      bootArgs: body.boot_args ?? defaultBootArgs,
    };
    return noContent;
  }

  private async putDrive(pathId: string, body: DriveBody): Promise<Reply> {
    if (body.drive_id !== pathId) throw new Error('The id from the path does not match the id from the body!');
    if (body.socket !== undefined) throw unsupported('A vhost-user-block drive (`socket`)');
    if (body.partuuid !== undefined) throw unsupported('`partuuid`');
    // The file makes these optional only for vhost-user-block, which the double does not offer.
    if (body.path_on_host === undefined) throw deserializeError('missing field `path_on_host`');
    if (body.is_read_only === undefined) throw deserializeError('missing field `is_read_only`');
    this.beginConfiguring();
    const otherRoot = this.drives.find((drive) => drive.isRootDevice && drive.driveId !== body.drive_id);
    if (body.is_root_device && otherRoot) throw new Error('A root block device already exists!');
    await checkOpenable(body.path_on_host, !body.is_read_only, 'Unable to create the block device');
    // rate_limiter, cache_type and io_engine change how fast the guest's I/O is, not what it sees: ignored.
    const drive: DriveConfig = {
      driveId: body.drive_id,
      pathOnHost: body.path_on_host,
      isReadOnly: body.is_read_only,
      isRootDevice: body.is_root_device,
    };
    const index = this.drives.findIndex((known) => known.driveId === drive.driveId);
    if (index === -1) this.drives.push(drive);
    else this.drives[index] = drive;
    return noContent;
  }

  private async patchDrive(pathId: string, body: PartialDriveBody): Promise<Reply> {
    if (body.drive_id !== pathId) throw new Error('The id from the path does not match the id from the body!');
    if (body.path_on_host === undefined && body.rate_limiter === undefined) {
      throw new Error('Please specify at least one property to patch: path_on_host, rate_limiter.');
    }
    this.requireStarted();
    const drive = this.drives.find((known) => known.driveId === pathId);
    // After a snapshot load only the machine knows the drives, so it judges the id.
    if (!drive && !this.fromSnapshot) throw new Error(`Unable to patch the block device: no drive \`${pathId}\` was configured.`);
    if (body.path_on_host === undefined) return noContent; // A rate limiter alone: ignored, as on PUT.
    // A restored drive's read-only flag is unknown here: only readability is checked then.
    await checkOpenable(body.path_on_host, drive ? !drive.isReadOnly : false, 'Unable to patch the block device');
    await this.machine.updateDrive(pathId, body.path_on_host);
    if (drive) drive.pathOnHost = body.path_on_host;
    return noContent;
  }

  private putVsock(body: VsockBody): Reply {
    this.beginConfiguring();
    this.vsock = { guestCid: body.guest_cid, udsPath: body.uds_path };
    return noContent;
  }

  /**
   * The double checks the call as Firecracker would but never opens the TAP `host_dev_name` names
   * (the test host has none): the Machine gives the guest a network of its own instead (QEMU's
   * user-mode networking stands in for the TAP).
   */
  private putNetworkInterface(pathId: string, body: NetworkInterfaceBody): Reply {
    const mac = body.guest_mac;
    if (mac !== undefined && !/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/i.test(mac)) throw deserializeError(`invalid MAC address \`${mac}\` at \`guest_mac\``);
    if (body.iface_id !== pathId) throw new Error('The id from the path does not match the id from the body!');
    if (body.mtu !== undefined) throw unsupported('`mtu`');
    // The guest boots through mvmctl's QEMU backend, whose NIC always has this MAC.
    if (mac !== undefined && mac.toLowerCase() !== GUEST_NET.mac) throw unsupported(`A guest_mac other than ${GUEST_NET.mac}`);
    this.beginConfiguring();
    if (this.networkInterface && this.networkInterface.ifaceId !== body.iface_id) throw unsupported('A second network interface');
    // Firecracker opens the TAP here; a name Linux cannot give an interface (IFNAMSIZ) fails then.
    if (Buffer.byteLength(body.host_dev_name) > 15) throw new Error(`Could not create the network device: the TAP name \`${body.host_dev_name}\` is longer than 15 bytes.`);
    // rx/tx rate limiters change how fast the guest's packets go, not what it sees: ignored.
    this.networkInterface = { ifaceId: body.iface_id, hostDevName: body.host_dev_name, ...(mac !== undefined && { guestMac: mac }) };
    return noContent;
  }

  private async action(type: string): Promise<Reply> {
    if (type === 'InstanceStart') return this.start();
    if (type === 'SendCtrlAltDel') {
      this.requireStarted();
      await this.machine.sendCtrlAltDel();
      return noContent;
    }
    throw new Error('Cannot flush metrics: no metrics were configured (PUT /metrics is not supported by the test double).');
  }

  private async start(): Promise<Reply> {
    this.requireNotStarted();
    if (!this.bootSource) throw new Error('Cannot start microvm without kernel configuration.');
    const config: MachineConfig = {
      vcpuCount: this.vcpuCount,
      memSizeMib: this.memSizeMib,
      ...this.bootSource,
      drives: this.drives.map((drive) => ({ ...drive })),
      ...(this.vsock && { vsock: { ...this.vsock } }),
      ...(this.networkInterface && { networkInterface: { ...this.networkInterface } }),
      entropy: this.entropy,
    };
    await this.settle(() => this.machine.start(config), 'running');
    return noContent;
  }

  /** Runs a start or load; a failed one leaves the machine in an unknown state, so the process is spent. */
  private async settle(run: () => Promise<void>, next: Phase): Promise<void> {
    try {
      await run();
      this.phase = next;
    } catch (err) {
      this.phase = 'failed';
      throw err;
    }
  }

  private async patchVm(state: 'Paused' | 'Resumed'): Promise<Reply> {
    this.requireStarted();
    if (state === 'Paused' && this.phase === 'running') {
      await this.machine.pause();
      this.phase = 'paused';
    } else if (state === 'Resumed' && this.phase === 'paused') {
      await this.machine.resume();
      this.phase = 'running';
    }
    return noContent;
  }

  private async createSnapshot(body: SnapshotCreateBody): Promise<Reply> {
    if (body.snapshot_type === 'Diff') throw unsupported('A Diff snapshot');
    this.requireStarted();
    if (this.phase !== 'paused') throw new Error('Cannot create snapshot: the microVM is not paused');
    await this.machine.createSnapshot(body.snapshot_path, body.mem_file_path);
    return noContent;
  }

  private async loadSnapshot(body: SnapshotLoadBody): Promise<Reply> {
    if (body.mem_file_path !== undefined && body.mem_backend !== undefined) {
      throw deserializeError('too many fields: either `mem_backend` or `mem_file_path` exclusively is required');
    }
    const memFilePath = body.mem_file_path ?? body.mem_backend?.backend_path;
    if (memFilePath === undefined) throw deserializeError('missing field: either `mem_backend` or `mem_file_path` is required');
    this.requireNotStarted();
    if (this.configured) throw new Error('Loading a microVM snapshot not allowed after configuring boot-specific resources.');
    if (body.mem_backend?.backend_type === 'Uffd') throw unsupported('A Uffd memory backend');
    if (body.clock_realtime === true) throw unsupported('`clock_realtime`');
    const resumeVm = body.resume_vm ?? false;
    const load = {
      snapshotPath: body.snapshot_path,
      memFilePath,
      ...(body.vsock_override && { vsockUdsPath: body.vsock_override.uds_path }),
      // The snapshot's NICs are known to the machine only, so it judges the ids.
      ...(body.network_overrides && {
        networkOverrides: body.network_overrides.map((override) => ({ ifaceId: override.iface_id, hostDevName: override.host_dev_name })),
      }),
      resumeVm,
    };
    this.fromSnapshot = true;
    await this.settle(() => this.machine.loadSnapshot(load), resumeVm ? 'running' : 'paused');
    return noContent;
  }
}

interface Context {
  spec: ApiSpec;
  double: FirecrackerDouble;
  serialized: ReturnType<typeof serializer>;
}

async function answer({ spec, double, serialized }: Context, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const body = await readBody(req);
  if (!body.ok) return fault(res, body.error);
  const method = req.method ?? '';
  const path = req.url ?? '/';
  const op = matchOperation(spec, method, path);
  if (!op) return fault(res, `Invalid request method and/or path: ${method} ${path.split('?')[0]}.`);
  const decoded = decodeBody(spec, op, body.text);
  if (!decoded.ok) return fault(res, decoded.error);
  try {
    const reply = await serialized(() => double.dispatch(op, decoded.value));
    return reply.status === 200 ? send(res, 200, reply.body) : send(res, 204);
  } catch (err) {
    return fault(res, err instanceof Error ? err.message : String(err));
  }
}

export async function serveApi(socketPath: string, machine: Machine, options: ApiServerOptions = {}): Promise<ApiServer> {
  const spec = loadApiSpec();
  const context: Context = {
    spec,
    double: new FirecrackerDouble(machine, options.id ?? 'anonymous-instance', spec.info.version),
    serialized: serializer(),
  };
  const server = createServer((req, res) => {
    // A client that hangs up mid-body rejects readBody; there is no one left to answer.
    answer(context, req, res).catch(() => res.destroy());
  });
  await listen(server, socketPath);
  return { close: () => closeServer(server, socketPath) };
}
