/**
 * The Firecracker backend's pieces that need no VM: the API calls config.ts makes (checked against
 * Firecracker's OpenAPI file and sent to the test double's API server with a recording Machine),
 * and when it can give a guest a NIC (tap.ts). api.ts's HTTP client: firecracker-api-client.test.ts.
 */
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { FirecrackerApi, FirecrackerApiError } from '../../src/backends/firecracker/api.js';
import { bootCalls, GUEST_CID, restoreCalls, snapshotCalls, vsockSocketPath, type ApiCall } from '../../src/backends/firecracker/config.js';
import { FirecrackerBackend } from '../../src/backends/firecracker/index.js';
import { tapName } from '../../src/backends/firecracker/tap.js';
import type { NicSpec, VmSpec } from '../../src/backends/types.js';
import { MvmError } from '../../src/errors.js';
import { serveApi } from '../firecracker-double/api-server.js';
import type { MachineConfig, SnapshotLoad } from '../firecracker-double/machine.js';
import { decodeBody, loadApiSpec, matchOperation } from '../firecracker-double/openapi.js';
import { FakeMachine } from './fake-machine.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-fc-backend-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
let sockets = 0;
const socketPath = () => join(scratch, `s-${sockets++}.sock`);
const never = new AbortController().signal;

const runDir = join(scratch, 'run');
const snapshotDir = join(scratch, 'snap');
mkdirSync(runDir);
mkdirSync(snapshotDir);
const kernel = join(scratch, 'vmlinux');
const initrd = join(scratch, 'initrd.cpio');
const rootBase = join(scratch, 'root.ext4');
const rootCopy = join(runDir, 'root-copy.ext4');
const dataA = join(scratch, 'a.ext4');
const dataB = join(scratch, 'b.ext4');
for (const file of [kernel, initrd, rootBase, rootCopy, dataA, dataB]) writeFileSync(file, '');

const spec: VmSpec = {
  name: 'exec-1f2e-a81c',
  runDir,
  kernel,
  initrd,
  kernelArgs: ['root=mvmroot', 'mvm.test=1'],
  accel: 'kvm',
  cpus: 2,
  memoryMiB: 384,
  drives: [
    { path: dataA, readOnly: true },
    { path: dataB, readOnly: false },
  ],
  rootDrive: { path: rootBase, copyOnWrite: true },
};
const restoreSpec = { ...spec, snapshot: { mode: 'restore' as const, dir: snapshotDir } };
const openNic: NicSpec = { restricted: false, forwards: [] };
const nicSpec: VmSpec = { ...spec, nic: openNic };
const tap = tapName({ MVM_FIRECRACKER_TAP: 'mvmtap0' });

const apiSpec = loadApiSpec();

/** Every call must name an operation of Firecracker's API and carry a body its schema takes. */
function assertAccepted(calls: readonly ApiCall[]): void {
  for (const call of calls) {
    const op = matchOperation(apiSpec, call.method, call.path);
    assert.ok(op, `${call.method} ${call.path} is no operation of Firecracker's API`);
    assert.ok(op.body, `${call.method} ${call.path} (${op.operationId}) takes no body`);
    const decoded = decodeBody(apiSpec, op, JSON.stringify(call.body));
    assert.ok(decoded.ok, `${call.method} ${call.path}: ${decoded.ok ? '' : decoded.error}`);
  }
}

function bodyOf(calls: readonly ApiCall[], method: string, path: string): Record<string, unknown> {
  const call = calls.find((c) => c.method === method && c.path === path);
  assert.ok(call, `no ${method} ${path}`);
  return call.body as Record<string, unknown>;
}

describe('Firecracker config: the calls match the API schema', () => {
  test('bootCalls: machine, kernel, drives mvmroot/mvm0/mvm1, vsock in runDir, entropy, then InstanceStart', () => {
    const calls = bootCalls(spec, rootCopy);
    assertAccepted(calls);
    assert.deepEqual(
      calls.map((c) => `${c.method} ${c.path}`),
      [
        'PUT /machine-config',
        'PUT /boot-source',
        'PUT /drives/mvmroot',
        'PUT /drives/mvm0',
        'PUT /drives/mvm1',
        'PUT /vsock',
        'PUT /entropy',
        'PUT /actions',
      ],
    );
    assert.deepEqual(bodyOf(calls, 'PUT', '/machine-config'), { vcpu_count: 2, mem_size_mib: 384 });
    const boot = bodyOf(calls, 'PUT', '/boot-source');
    assert.equal(boot.kernel_image_path, kernel);
    assert.equal(boot.initrd_path, initrd);
    const args = String(boot.boot_args).split(' ');
    assert.ok(args.includes('mvm.agent=vsock:5252'), String(boot.boot_args));
    assert.ok(args.includes('root=mvmroot') && args.includes('mvm.test=1'), String(boot.boot_args));
    assert.ok(args.includes('console=ttyS0'));
    // The image's arguments come last, so they can override the backend's.
    assert.deepEqual(args.slice(-2), ['root=mvmroot', 'mvm.test=1']);
    assert.deepEqual(bodyOf(calls, 'PUT', '/drives/mvmroot'), { drive_id: 'mvmroot', path_on_host: rootCopy, is_root_device: false, is_read_only: false });
    assert.deepEqual(bodyOf(calls, 'PUT', '/drives/mvm0'), { drive_id: 'mvm0', path_on_host: dataA, is_root_device: false, is_read_only: true });
    assert.deepEqual(bodyOf(calls, 'PUT', '/drives/mvm1'), { drive_id: 'mvm1', path_on_host: dataB, is_root_device: false, is_read_only: false });
    const vsock = bodyOf(calls, 'PUT', '/vsock');
    assert.equal(vsock.guest_cid, GUEST_CID);
    assert.equal(vsock.uds_path, join(runDir, 'vsock.sock'));
    assert.equal(vsock.uds_path, vsockSocketPath(runDir));
    assert.deepEqual(calls.at(-1), { method: 'PUT', path: '/actions', body: { action_type: 'InstanceStart' } });
  });

  test('bootCalls without initrd, root drive or extra drives is accepted too', () => {
    const bare: VmSpec = { name: 'bare', runDir, kernel, kernelArgs: [], accel: 'kvm', cpus: 1, memoryMiB: 128, drives: [] };
    const calls = bootCalls(bare, undefined);
    assertAccepted(calls);
    const boot = bodyOf(calls, 'PUT', '/boot-source');
    assert.equal(Object.hasOwn(boot, 'initrd_path'), false);
    assert.equal(calls.filter((c) => c.path.startsWith('/drives/')).length, 0);
  });

  test('the root drive is left out when there is no root path to write to', () => {
    const calls = bootCalls(spec, undefined);
    assertAccepted(calls);
    assert.deepEqual(
      calls.filter((c) => c.path.startsWith('/drives/')).map((c) => c.path),
      ['/drives/mvm0', '/drives/mvm1'],
    );
  });

  test('restoreCalls: load paused with a vsock_override, PATCH every drive, then resume', () => {
    const calls = restoreCalls(restoreSpec, rootCopy);
    assertAccepted(calls);
    assert.deepEqual(
      calls.map((c) => `${c.method} ${c.path}`),
      ['PUT /snapshot/load', 'PATCH /drives/mvmroot', 'PATCH /drives/mvm0', 'PATCH /drives/mvm1', 'PATCH /vm'],
    );
    assert.deepEqual(calls[0].body, {
      snapshot_path: join(snapshotDir, 'state'),
      mem_backend: { backend_type: 'File', backend_path: join(snapshotDir, 'ram') },
      vsock_override: { uds_path: join(runDir, 'vsock.sock') },
      resume_vm: false,
    });
    assert.deepEqual(bodyOf(calls, 'PATCH', '/drives/mvmroot'), { drive_id: 'mvmroot', path_on_host: rootCopy });
    assert.deepEqual(bodyOf(calls, 'PATCH', '/drives/mvm0'), { drive_id: 'mvm0', path_on_host: dataA });
    assert.deepEqual(bodyOf(calls, 'PATCH', '/drives/mvm1'), { drive_id: 'mvm1', path_on_host: dataB });
    assert.deepEqual(calls.at(-1)?.body, { state: 'Resumed' });
  });

  test('snapshotCalls: pause, then a Full snapshot into dir/state and dir/ram', () => {
    const calls = snapshotCalls(snapshotDir);
    assertAccepted(calls);
    assert.deepEqual(calls, [
      { method: 'PATCH', path: '/vm', body: { state: 'Paused' } },
      {
        method: 'PUT',
        path: '/snapshot/create',
        body: { snapshot_type: 'Full', snapshot_path: join(snapshotDir, 'state'), mem_file_path: join(snapshotDir, 'ram') },
      },
    ]);
  });

  test('bootCalls with a NIC put it on the TAP MVM_FIRECRACKER_TAP names, before InstanceStart', () => {
    assert.equal(tap, 'mvmtap0');
    const calls = bootCalls(nicSpec, rootCopy, tap);
    assertAccepted(calls);
    const paths = calls.map((c) => `${c.method} ${c.path}`);
    assert.ok(paths.indexOf('PUT /network-interfaces/eth0') >= 0, paths.join(', '));
    assert.ok(paths.indexOf('PUT /network-interfaces/eth0') < paths.indexOf('PUT /actions'));
    assert.deepEqual(bodyOf(calls, 'PUT', '/network-interfaces/eth0'), { iface_id: 'eth0', host_dev_name: 'mvmtap0', guest_mac: '52:54:00:12:34:56' });
    // No NIC asked for: no network call, whatever TAP there is.
    assert.equal(bootCalls(spec, rootCopy, tap).filter((c) => c.path.startsWith('/network-interfaces/')).length, 0);
    assert.throws(() => bootCalls(nicSpec, rootCopy, undefined), /needs the TAP device/);
  });

  test('restoreCalls with a NIC move it to this host\'s TAP with network_overrides', () => {
    const calls = restoreCalls({ ...restoreSpec, nic: openNic }, rootCopy, tap);
    assertAccepted(calls);
    assert.deepEqual(bodyOf(calls, 'PUT', '/snapshot/load').network_overrides, [{ iface_id: 'eth0', host_dev_name: 'mvmtap0' }]);
    assert.equal(Object.hasOwn(bodyOf(restoreCalls(restoreSpec, rootCopy, tap), 'PUT', '/snapshot/load'), 'network_overrides'), false);
  });

  test('the validator does refuse a body Firecracker would refuse (the checks above mean something)', () => {
    const op = matchOperation(apiSpec, 'PUT', '/drives/mvm0');
    assert.ok(op);
    const decoded = decodeBody(apiSpec, op, JSON.stringify({ drive_id: 'mvm0', path_on_host: dataA, is_root_device: false, read_only: true }));
    assert.equal(decoded.ok, false);
  });
});

async function send(api: FirecrackerApi, calls: readonly ApiCall[]): Promise<void> {
  for (const call of calls) {
    const answer = call.method === 'PUT' ? await api.put(call.path, call.body, { signal: never }) : await api.patch(call.path, call.body, { signal: never });
    assert.equal(answer, undefined, `${call.method} ${call.path} answered a body`);
  }
}

async function withDouble(fn: (api: FirecrackerApi, machine: FakeMachine) => Promise<void>): Promise<void> {
  const path = socketPath();
  const machine = new FakeMachine();
  const server = await serveApi(path, machine, { id: 'fc-backend-test' });
  try {
    await fn(new FirecrackerApi(path), machine);
  } finally {
    await server.close();
  }
}

describe("Firecracker config against the test double's API server", () => {
  test('bootCalls, sent in order, start the machine with the configuration asked for', async () => {
    await withDouble(async (api, machine) => {
      await send(api, bootCalls(spec, rootCopy));
      const expected: MachineConfig = {
        vcpuCount: 2,
        memSizeMib: 384,
        kernelImagePath: kernel,
        initrdPath: initrd,
        bootArgs: `console=ttyS0 reboot=k panic=1 pci=off mvm.agent=vsock:5252 root=mvmroot mvm.test=1`,
        drives: [
          { driveId: 'mvmroot', pathOnHost: rootCopy, isReadOnly: false, isRootDevice: false },
          { driveId: 'mvm0', pathOnHost: dataA, isReadOnly: true, isRootDevice: false },
          { driveId: 'mvm1', pathOnHost: dataB, isReadOnly: false, isRootDevice: false },
        ],
        vsock: { guestCid: GUEST_CID, udsPath: join(runDir, 'vsock.sock') },
        entropy: true,
      };
      assert.deepEqual(machine.calls, [['start', expected]]);
      // And the double says it runs.
      const info = (await api.get('/', { signal: never })) as { state: string; id: string };
      assert.equal(info.state, 'Running');
      assert.equal(info.id, 'fc-backend-test');
    });
  });

  test('snapshotCalls after a boot pause the machine, then snapshot it', async () => {
    await withDouble(async (api, machine) => {
      await send(api, bootCalls(spec, rootCopy));
      await send(api, snapshotCalls(snapshotDir));
      assert.deepEqual(machine.calls.slice(1), [['pause'], ['createSnapshot', join(snapshotDir, 'state'), join(snapshotDir, 'ram')]]);
    });
  });

  test('restoreCalls on a fresh process load paused, repoint every drive, then resume', async () => {
    await withDouble(async (api, machine) => {
      await send(api, restoreCalls(restoreSpec, rootCopy));
      assert.deepEqual(machine.calls, [
        ['loadSnapshot', { snapshotPath: join(snapshotDir, 'state'), memFilePath: join(snapshotDir, 'ram'), vsockUdsPath: join(runDir, 'vsock.sock'), resumeVm: false }],
        ['updateDrive', 'mvmroot', rootCopy],
        ['updateDrive', 'mvm0', dataA],
        ['updateDrive', 'mvm1', dataB],
        ['resume'],
      ]);
    });
  });

  test('bootCalls with a NIC give the machine that network interface; a restore passes the override', async () => {
    await withDouble(async (api, machine) => {
      await send(api, bootCalls(nicSpec, rootCopy, tap));
      const [, config] = machine.calls[0] as [string, MachineConfig];
      assert.deepEqual(config.networkInterface, { ifaceId: 'eth0', hostDevName: 'mvmtap0', guestMac: '52:54:00:12:34:56' });
    });
    await withDouble(async (api, machine) => {
      await send(api, restoreCalls({ ...restoreSpec, nic: openNic }, rootCopy, tap));
      const [, load] = machine.calls[0] as [string, SnapshotLoad];
      assert.deepEqual(load.networkOverrides, [{ ifaceId: 'eth0', hostDevName: 'mvmtap0' }]);
    });
  });

  test("a call the double refuses becomes a FirecrackerApiError with the double's fault message", async () => {
    await withDouble(async (api) => {
      const missing = { ...spec, kernel: join(scratch, 'no-such-kernel') };
      await assert.rejects(send(api, bootCalls(missing, rootCopy)), (error: unknown) => {
        assert.ok(error instanceof FirecrackerApiError);
        assert.equal(error.call, 'PUT /boot-source');
        assert.equal(error.status, 400);
        assert.match(error.message, /^Firecracker refused PUT \/boot-source: The kernel file cannot be opened/);
        return true;
      });
    });
  });
});

describe('Firecracker NIC: nicUnavailable, and start', () => {
  const reasonFor = (env: NodeJS.ProcessEnv, nic: NicSpec = openNic) => new FirecrackerBackend(env).nicUnavailable(nic) ?? '';

  test('an allowlist or port forwards need the qemu backend, TAP or not', () => {
    const forwards: NicSpec = { restricted: false, forwards: [{ hostAddress: '127.0.0.1', hostPort: 8080, guestPort: 80 }] };
    for (const nic of [{ restricted: true, proxySocket: join(runDir, 'proxy.sock'), forwards: [] }, forwards, { ...forwards, restricted: true }]) {
      assert.match(reasonFor({ MVM_FIRECRACKER_TAP: 'lo' }, nic), /^--allow-host and -p need the qemu backend .*: use --backend qemu$/);
    }
  });

  test('without MVM_FIRECRACKER_TAP: how to make a TAP, or qemu', () => {
    for (const env of [{}, { MVM_FIRECRACKER_TAP: '' }]) {
      assert.match(reasonFor(env), /^--net user with Firecracker needs a TAP device: create one \('ip tuntap add mvmtap0 mode tap user \$USER'.* and set MVM_FIRECRACKER_TAP=mvmtap0; or use --backend qemu$/);
    }
  });

  test('MVM_FIRECRACKER_TAP naming a device this host lacks says so; one it has is taken', () => {
    for (const name of ['mvm-no-such-tap0', '../..']) assert.ok(reasonFor({ MVM_FIRECRACKER_TAP: name }).startsWith(`MVM_FIRECRACKER_TAP=${name}: this host has no network device of that name`));
    // Whether it is a TAP this user may open is Firecracker's to say, at PUT /network-interfaces.
    assert.equal(reasonFor({ MVM_FIRECRACKER_TAP: 'lo' }), '');
  });

  test('start refuses a NIC it cannot give before starting Firecracker', async () => {
    await assert.rejects(new FirecrackerBackend({ MVM_FIRECRACKER: process.execPath }).start(nicSpec, never), (error: unknown) => {
      assert.ok(error instanceof MvmError);
      assert.match(error.message, /^--net user with Firecracker needs a TAP device/);
      return true;
    });
  });
});
