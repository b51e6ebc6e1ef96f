/** The Firecracker test double's API server and validator, driven over its unix socket against a recording fake Machine. */
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { serveApi } from '../firecracker-double/api-server.js';
import { loadApiSpec, matchOperation, validateBody } from '../firecracker-double/openapi.js';
import type { MachineConfig } from '../firecracker-double/machine.js';
import { FakeMachine } from './fake-machine.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-fcapi-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
const kernel = join(scratch, 'vmlinux');
const initrd = join(scratch, 'initrd');
const rootfs = join(scratch, 'rootfs.ext4');
const data = join(scratch, 'data.ext4');
for (const file of [kernel, initrd, rootfs, data]) writeFileSync(file, 'x');
let sockets = 0;


interface Answer {
  status: number;
  body: unknown;
}

/** One request; a string body is sent as is, anything else as JSON. */
function call(socketPath: string, method: string, path: string, body?: unknown): Promise<Answer> {
  const payload = body === undefined ? '' : typeof body === 'string' ? body : JSON.stringify(body);
  // An explicit length: Node sends a GET's or DELETE's body unframed otherwise.
  const headers = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) };
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode ?? 0, body: text === '' ? undefined : JSON.parse(text) });
      });
    });
    req.on('error', reject);
    req.end(payload);
  });
}

type Api = (method: string, path: string, body?: unknown) => Promise<Answer>;

/** Serves a fresh double for `fn`, then checks close() removes the socket. */
async function withDouble(fn: (api: Api, machine: FakeMachine) => Promise<void>): Promise<void> {
  const socketPath = join(scratch, `api-${sockets++}.sock`);
  const machine = new FakeMachine();
  const server = await serveApi(socketPath, machine, { id: 'test-vm' });
  try {
    await fn((method, path, body) => call(socketPath, method, path, body), machine);
  } finally {
    await server.close();
  }
  assert.equal(existsSync(socketPath), false, 'close() leaves no socket file');
}

function assertFault(answer: Answer, ...fragments: string[]): void {
  assert.equal(answer.status, 400, JSON.stringify(answer.body));
  const message = (answer.body as { fault_message: string }).fault_message;
  for (const fragment of fragments) assert.ok(message.includes(fragment), `${JSON.stringify(message)} lacks ${JSON.stringify(fragment)}`);
}

const ok = (answer: Answer) => assert.equal(answer.status, 204, JSON.stringify(answer.body));
const bootSource = { kernel_image_path: kernel, initrd_path: initrd, boot_args: 'console=ttyS0' };
const rootDrive = { drive_id: 'rootfs', path_on_host: rootfs, is_root_device: true, is_read_only: false };
const start = { action_type: 'InstanceStart' };

/** A double that has booted from `bootSource` alone. */
async function booted(api: Api): Promise<void> {
  ok(await api('PUT', '/boot-source', bootSource));
  ok(await api('PUT', '/actions', start));
}

test('a full boot sequence reaches machine.start with the configured MachineConfig', async () => {
  await withDouble(async (api, machine) => {
    assert.deepEqual((await api('GET', '/')).body, { id: 'test-vm', state: 'Not started', vmm_version: '1.16.1', app_name: 'Firecracker' });
    ok(await api('PUT', '/machine-config', { vcpu_count: 2, mem_size_mib: 256 }));
    ok(await api('PUT', '/boot-source', bootSource));
    ok(await api('PUT', '/drives/rootfs', { ...rootDrive, is_read_only: true }));
    ok(await api('PUT', '/drives/data', { drive_id: 'data', path_on_host: data, is_root_device: false, is_read_only: false }));
    ok(await api('PUT', '/drives/rootfs', rootDrive)); // a re-PUT updates in place, keeping the order
    ok(await api('PUT', '/vsock', { guest_cid: 3, uds_path: join(scratch, 'v.sock') }));
    ok(await api('PUT', '/entropy', {}));
    const machineConfig = await api('GET', '/machine-config');
    assert.deepEqual(machineConfig.body, { vcpu_count: 2, mem_size_mib: 256, smt: false, track_dirty_pages: false, huge_pages: 'None' });
    assert.deepEqual(machine.calls, []);
    ok(await api('PUT', '/actions', start));
    const expected: MachineConfig = {
      vcpuCount: 2,
      memSizeMib: 256,
      kernelImagePath: kernel,
      initrdPath: initrd,
      bootArgs: 'console=ttyS0',
      drives: [
        { driveId: 'rootfs', pathOnHost: rootfs, isReadOnly: false, isRootDevice: true },
        { driveId: 'data', pathOnHost: data, isReadOnly: false, isRootDevice: false },
      ],
      vsock: { guestCid: 3, udsPath: join(scratch, 'v.sock') },
      entropy: true,
    };
    assert.deepEqual(machine.calls, [['start', expected]]);
    assert.equal((await api('GET', '/') as { body: { state: string } }).body.state, 'Running');
    ok(await api('PATCH', '/drives/data', { drive_id: 'data', path_on_host: rootfs }));
    ok(await api('PUT', '/actions', { action_type: 'SendCtrlAltDel' }));
    assert.deepEqual(machine.calls.slice(1), [['updateDrive', 'data', rootfs], ['sendCtrlAltDel']]);
  });
});

test('boot-source alone boots with Firecracker defaults', async () => {
  await withDouble(async (api, machine) => {
    ok(await api('PUT', '/boot-source', { kernel_image_path: kernel }));
    ok(await api('PUT', '/actions', start));
    const [, config] = machine.calls[0] as [string, MachineConfig];
    assert.equal(config.vcpuCount, 1);
    assert.equal(config.memSizeMib, 128);
    assert.equal(config.initrdPath, undefined);
    assert.match(config.bootArgs, /^reboot=k panic=1 /);
    assert.deepEqual(config.drives, []);
    assert.equal(config.entropy, false);
  });
});

test('schema errors name the field, in serde words', async () => {
  await withDouble(async (api, machine) => {
    assertFault(await api('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 128, foo: 1 }), 'unknown field `foo`', 'expected one of `cpu_template`', '`vcpu_count`');
    assertFault(await api('PUT', '/drives/rootfs', { drive_id: 'rootfs', path_on_host: rootfs, is_read_only: false }), 'missing field `is_root_device`');
    assertFault(await api('PUT', '/drives/rootfs', { drive_id: 'rootfs', is_root_device: true, is_read_only: false }), 'missing field `path_on_host`');
    assertFault(await api('PUT', '/machine-config', { vcpu_count: '2', mem_size_mib: 128 }), 'invalid type: string "2", expected an integer at `vcpu_count`');
    assertFault(await api('PUT', '/machine-config', { vcpu_count: 1.5, mem_size_mib: 128 }), 'floating point `1.5`');
    assertFault(await api('PUT', '/machine-config', { vcpu_count: 33, mem_size_mib: 128 }), 'expected an integer <= 32 at `vcpu_count`');
    assertFault(await api('PUT', '/vsock', { guest_cid: 2, uds_path: 'v.sock' }), 'expected an integer >= 3 at `guest_cid`');
    assertFault(await api('PUT', '/actions', { action_type: 'Reboot' }), 'unknown variant `Reboot`', '`InstanceStart`');
    assertFault(await api('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 128, cpu_template: 'Z9' }), 'unknown variant `Z9`');
    const nested = { snapshot_path: 's', mem_backend: { backend_path: 'm', kind: 1 } };
    assertFault(await api('PUT', '/snapshot/load', nested), 'missing field `backend_type` at `mem_backend`', 'unknown field `kind`');
    assertFault(await api('PUT', '/boot-source', [bootSource]), 'invalid type: sequence, expected a map');
    assertFault(await api('PUT', '/boot-source', '{"kernel_image_path": '), 'An error occurred when deserializing the json body of a request');
    assertFault(await api('PUT', '/boot-source'), 'Empty PUT request.');
    assertFault(await api('PUT', '/machine-config'), 'Empty PUT request.');
    assertFault(await api('GET', '/machine-config', {}), 'GET request cannot have a body.');
    assert.deepEqual(machine.calls, []);
  });
});

test('unknown paths and methods, bad ids and what the double does not offer answer 400', async () => {
  await withDouble(async (api) => {
    assertFault(await api('GET', '/nope'), 'Invalid request method and/or path: GET /nope.');
    assertFault(await api('DELETE', '/drives/rootfs'), 'Invalid request method and/or path: DELETE /drives/rootfs.');
    assertFault(await api('PUT', '/drives'), 'Invalid request method and/or path');
    assertFault(await api('PUT', '/drives/root-fs', { ...rootDrive, drive_id: 'root-fs' }), 'alphanumeric characters and underscores');
    assertFault(await api('PUT', '/logger', { log_path: 'l' }), 'PUT /logger is not supported by the test double.');
    assertFault(await api('PATCH', '/network-interfaces/eth0', { iface_id: 'eth0' }), 'PATCH /network-interfaces/{iface_id} is not supported by the test double.');
    assertFault(await api('PUT', '/machine-config', { vcpu_count: 2, mem_size_mib: 128, smt: true }), 'smt is not supported by the test double');
    assertFault(await api('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 0 }), 'The memory size (MiB)');
    assertFault(await api('PUT', '/boot-source', { kernel_image_path: join(scratch, 'missing') }), 'The kernel file cannot be opened', 'ENOENT');
    assertFault(await api('PUT', '/actions', { action_type: 'FlushMetrics' }), 'no metrics were configured');
  });
});

test('drives: the body id must match the path, there is one root device', async () => {
  await withDouble(async (api) => {
    assertFault(await api('PUT', '/drives/other', rootDrive), 'The id from the path does not match the id from the body!');
    ok(await api('PUT', '/drives/rootfs', rootDrive));
    assertFault(await api('PUT', '/drives/second', { ...rootDrive, drive_id: 'second' }), 'A root block device already exists!');
    assertFault(await api('PUT', '/drives/vhost', { drive_id: 'vhost', is_root_device: false, socket: 's' }), 'vhost-user-block');
    assertFault(await api('PATCH', '/drives/rootfs', { drive_id: 'rootfs', path_on_host: data }), 'not supported before starting');
  });
});

test('pre-boot calls after InstanceStart, and InstanceStart without a kernel, answer 400', async () => {
  await withDouble(async (api, machine) => {
    assertFault(await api('PUT', '/actions', start), 'Cannot start microvm without kernel configuration.');
    assertFault(await api('PATCH', '/vm', { state: 'Paused' }), 'not supported before starting the microVM');
    assert.deepEqual(machine.calls, []);
    await booted(api);
    const afterStart = 'The requested operation is not supported after starting the microVM.';
    assertFault(await api('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 128 }), afterStart);
    assertFault(await api('PUT', '/drives/rootfs', rootDrive), afterStart);
    assertFault(await api('PUT', '/actions', start), afterStart);
    assertFault(await api('PATCH', '/drives/nope', { drive_id: 'nope', path_on_host: data }), 'no drive `nope`');
    assert.equal(machine.calls.length, 1);
  });
});

test('network-interfaces: a valid PUT reaches machine.start; the double never opens the TAP', async () => {
  await withDouble(async (api, machine) => {
    const nic = { iface_id: 'eth0', host_dev_name: 'mvm-tap-absent', guest_mac: '52:54:00:12:34:56' };
    ok(await api('PUT', '/network-interfaces/eth0', { ...nic, host_dev_name: 'tap0' }));
    ok(await api('PUT', '/network-interfaces/eth0', nic)); // a re-PUT replaces it
    await booted(api);
    const [, config] = machine.calls[0] as [string, MachineConfig];
    assert.deepEqual(config.networkInterface, { ifaceId: 'eth0', hostDevName: 'mvm-tap-absent', guestMac: '52:54:00:12:34:56' });
  });
  await withDouble(async (api, machine) => {
    ok(await api('PUT', '/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: 'tap0' })); // no MAC: Firecracker's own choice
    await booted(api);
    assert.deepEqual((machine.calls[0] as [string, MachineConfig])[1].networkInterface, { ifaceId: 'eth0', hostDevName: 'tap0' });
  });
});

test('network-interfaces: what Firecracker or the double refuses answers 400', async () => {
  await withDouble(async (api, machine) => {
    const nic = { iface_id: 'eth0', host_dev_name: 'tap0' };
    assertFault(await api('PUT', '/network-interfaces/eth0', { ...nic, tap: 'x' }), 'unknown field `tap`', '`host_dev_name`');
    assertFault(await api('PUT', '/network-interfaces/eth0', { iface_id: 'eth0' }), 'missing field `host_dev_name`');
    assertFault(await api('PUT', '/network-interfaces/eth0', { ...nic, guest_mac: '52:54:00:12:34' }), 'invalid MAC address');
    assertFault(await api('PUT', '/network-interfaces/eth1', nic), 'The id from the path does not match the id from the body!');
    assertFault(await api('PUT', '/network-interfaces/eth0', { ...nic, mtu: 1400 }), '`mtu` is not supported by the test double');
    assertFault(await api('PUT', '/network-interfaces/eth0', { ...nic, guest_mac: '02:00:00:00:00:01' }), 'guest_mac other than 52:54:00:12:34:56');
    assertFault(await api('PUT', '/network-interfaces/eth0', { ...nic, host_dev_name: 'a-tap-name-of-16' }), 'longer than 15 bytes');
    ok(await api('PUT', '/network-interfaces/eth0', nic));
    assertFault(await api('PUT', '/network-interfaces/eth1', { ...nic, iface_id: 'eth1' }), 'A second network interface is not supported');
    await booted(api);
    assertFault(await api('PUT', '/network-interfaces/eth0', nic), 'The requested operation is not supported after starting the microVM.');
    assert.equal(machine.calls.length, 1);
  });
  await withDouble(async (api, machine) => {
    ok(await api('PUT', '/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: 'tap0' }));
    assertFault(await api('PUT', '/snapshot/load', { snapshot_path: 's', mem_file_path: 'm' }), 'not allowed after configuring boot-specific resources');
    assert.deepEqual(machine.calls, []);
  });
});

test('snapshot/create needs a paused microVM and a Full snapshot', async () => {
  await withDouble(async (api, machine) => {
    const create = { snapshot_path: 'state', mem_file_path: 'mem' };
    await booted(api);
    assertFault(await api('PUT', '/snapshot/create', create), 'Cannot create snapshot: the microVM is not paused');
    ok(await api('PATCH', '/vm', { state: 'Paused' }));
    assertFault(await api('PUT', '/snapshot/create', { ...create, snapshot_type: 'Diff' }), 'Diff snapshot is not supported by the test double');
    ok(await api('PUT', '/snapshot/create', { ...create, snapshot_type: 'Full' }));
    ok(await api('PATCH', '/vm', { state: 'Resumed' }));
    assert.deepEqual(machine.calls.slice(1), [['pause'], ['createSnapshot', 'state', 'mem'], ['resume']]);
  });
});

test('snapshot/load is refused after any configuration call', async () => {
  await withDouble(async (api, machine) => {
    ok(await api('PUT', '/entropy', {}));
    const load = await api('PUT', '/snapshot/load', { snapshot_path: 's', mem_file_path: 'm' });
    assertFault(load, 'Loading a microVM snapshot not allowed after configuring boot-specific resources.');
    assert.deepEqual(machine.calls, []);
  });
});

test('snapshot/load on a fresh process passes vsock_override and resume_vm, once', async () => {
  await withDouble(async (api, machine) => {
    const load = { snapshot_path: 's', mem_file_path: 'm', vsock_override: { uds_path: 'new.sock' }, resume_vm: true };
    ok(await api('PUT', '/snapshot/load', load));
    assert.deepEqual(machine.calls, [['loadSnapshot', { snapshotPath: 's', memFilePath: 'm', vsockUdsPath: 'new.sock', resumeVm: true }]]);
    assert.equal((await api('GET', '/') as { body: { state: string } }).body.state, 'Running');
    assertFault(await api('PUT', '/snapshot/load', load), 'not supported after starting');
    ok(await api('PATCH', '/drives/rootfs', { drive_id: 'rootfs', path_on_host: data })); // the machine knows the drives
  });
  await withDouble(async (api, machine) => {
    const both = { snapshot_path: 's', mem_file_path: 'm', mem_backend: { backend_type: 'File', backend_path: 'm' } };
    assertFault(await api('PUT', '/snapshot/load', both), 'exclusively is required');
    assertFault(await api('PUT', '/snapshot/load', { snapshot_path: 's' }), 'either `mem_backend` or `mem_file_path` is required');
    const badOverride = { snapshot_path: 's', mem_file_path: 'm', network_overrides: [{ iface_id: 'eth0' }] };
    assertFault(await api('PUT', '/snapshot/load', badOverride), 'missing field `host_dev_name` at `network_overrides[0]`');
    const uffd = { snapshot_path: 's', mem_backend: { backend_type: 'Uffd', backend_path: 'u.sock' } };
    assertFault(await api('PUT', '/snapshot/load', uffd), 'Uffd memory backend is not supported by the test double');
    ok(await api('PUT', '/snapshot/load', { snapshot_path: 's', mem_backend: { backend_type: 'File', backend_path: 'm' } }));
    assert.deepEqual(machine.calls, [['loadSnapshot', { snapshotPath: 's', memFilePath: 'm', resumeVm: false }]]);
    assert.equal((await api('GET', '/') as { body: { state: string } }).body.state, 'Paused');
    ok(await api('PUT', '/snapshot/create', { snapshot_path: 's2', mem_file_path: 'm2' }));
  });
});

test('snapshot/load passes network_overrides to the machine, which knows the NICs', async () => {
  await withDouble(async (api, machine) => {
    const load = { snapshot_path: 's', mem_file_path: 'm', network_overrides: [{ iface_id: 'eth0', host_dev_name: 'tap1' }] };
    ok(await api('PUT', '/snapshot/load', load));
    assert.deepEqual(machine.calls, [['loadSnapshot', { snapshotPath: 's', memFilePath: 'm', networkOverrides: [{ ifaceId: 'eth0', hostDevName: 'tap1' }], resumeVm: false }]]);
  });
});

test('a body over 64 KiB is refused', async () => {
  await withDouble(async (api) => {
    const big = { kernel_image_path: 'k'.repeat(70 * 1024) };
    assertFault(await api('PUT', '/boot-source', big), 'is larger than the limit of 65536');
    ok(await api('PUT', '/boot-source', bootSource));
  });
});

test('a failed start answers its message and spends the process', async () => {
  await withDouble(async (api, machine) => {
    machine.failWith = new Error('qemu exited with status 1');
    ok(await api('PUT', '/boot-source', bootSource));
    assertFault(await api('PUT', '/actions', start), 'qemu exited with status 1');
    assertFault(await api('PUT', '/actions', start), 'start a new test double process');
    assert.equal(machine.calls.length, 1);
  });
});

test('machine calls run one at a time, in arrival order', async () => {
  await withDouble(async (api, machine) => {
    await booted(api);
    machine.delayMs = 20;
    const answers = await Promise.all([
      api('PATCH', '/vm', { state: 'Paused' }),
      api('PUT', '/snapshot/create', { snapshot_path: 's', mem_file_path: 'm' }),
      api('PATCH', '/vm', { state: 'Resumed' }),
    ]);
    answers.forEach(ok);
    assert.equal(machine.maxActive, 1);
    assert.deepEqual(machine.calls.slice(1).map(([name]) => name), ['pause', 'createSnapshot', 'resume']);
  });
});

test('validator: every operation in the file matches, refs resolve, nulls read as absent', () => {
  const spec = loadApiSpec();
  for (const [template, operations] of Object.entries(spec.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const path = template.replace(/\{\w+\}/g, 'x1');
      const match = matchOperation(spec, method, path);
      assert.equal(match?.operationId, operation.operationId, `${method} ${path}`);
      if (match?.body) assert.ok(Array.isArray(validateBody(match.body.schema, {}, spec)), 'its $refs resolve');
    }
  }
  assert.deepEqual(matchOperation(spec, 'PUT', '/drives/rootfs/?x=1')?.params, { drive_id: 'rootfs' });
  const drive = matchOperation(spec, 'PUT', '/drives/rootfs')!.body!.schema;
  assert.deepEqual(validateBody(drive, { drive_id: 'a', is_root_device: false, partuuid: null }, spec), []);
  assert.deepEqual(validateBody(drive, { drive_id: null, is_root_device: false }, spec), ['invalid type: null, expected a string at `drive_id`']);
  assert.equal(validateBody(drive, JSON.parse('{"drive_id": "a", "is_root_device": true, "__proto__": 1}'), spec).length, 1);
  const limiter = { drive_id: 'a', is_root_device: false, rate_limiter: { bandwidth: { size: -1 } } };
  assert.deepEqual(validateBody(drive, limiter, spec), [
    'missing field `refill_time` at `rate_limiter.bandwidth`',
    'invalid value: integer `-1`, expected an integer >= 0 at `rate_limiter.bandwidth.size`',
  ]);
  const mmds = matchOperation(spec, 'PUT', '/mmds')!.body!.schema;
  assert.deepEqual(validateBody(mmds, { anything: { goes: [1] } }, spec), []);
});
