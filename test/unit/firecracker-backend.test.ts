/**
 * The Firecracker backend's pieces that need no VM: the API calls config.ts makes (checked against
 * Firecracker's OpenAPI file and sent to the test double's API server with a recording Machine),
 * and api.ts's HTTP client against small stand-in servers.
 */
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { FirecrackerApi, FirecrackerApiError } from '../../src/backends/firecracker/api.js';
import { bootCalls, GUEST_CID, restoreCalls, snapshotCalls, vsockSocketPath, type ApiCall } from '../../src/backends/firecracker/config.js';
import type { VmSpec } from '../../src/backends/types.js';
import { MvmError } from '../../src/errors.js';
import { serveApi } from '../firecracker-double/api-server.js';
import type { MachineConfig } from '../firecracker-double/machine.js';
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

/** A stand-in API server on a unix socket; `handler` answers every request. */
async function withServer(
  handler: (req: IncomingMessage, res: ServerResponse, body: string) => void,
  fn: (api: FirecrackerApi, path: string) => Promise<void>,
): Promise<void> {
  const path = socketPath();
  const server: Server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => (body += chunk.toString('utf8')));
    req.on('end', () => handler(req, res, body));
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  try {
    await fn(new FirecrackerApi(path), path);
  } finally {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}

describe('Firecracker API client', () => {
  test('a 400 with a fault_message rejects with a one-line FirecrackerApiError, exit code 125', async () => {
    await withServer(
      (_req, res) => res.writeHead(400, { 'content-type': 'application/json' }).end(JSON.stringify({ fault_message: 'bad\nthing' })),
      async (api) => {
        await assert.rejects(api.put('/x', { a: 1 }, { signal: never }), (error: unknown) => {
          assert.ok(error instanceof FirecrackerApiError);
          assert.ok(error instanceof MvmError);
          assert.equal(error.message, 'Firecracker refused PUT /x: bad thing');
          assert.equal(error.exitCode, 125);
          assert.equal(error.status, 400);
          assert.equal(error.call, 'PUT /x');
          assert.equal(error.faultMessage, 'bad thing');
          return true;
        });
      },
    );
  });

  test('an error without a JSON body is named by its text, or by its status when empty', async () => {
    let empty = false;
    await withServer(
      (_req, res) => (empty ? res.writeHead(500).end() : res.writeHead(503).end('  overloaded\n  now \n')),
      async (api) => {
        await assert.rejects(api.patch('/vm', { state: 'Paused' }, { signal: never }), { message: 'Firecracker refused PATCH /vm: overloaded now', status: 503 });
        empty = true;
        await assert.rejects(api.get('/', { signal: never }), { message: 'Firecracker refused GET /: HTTP 500', status: 500 });
      },
    );
  });

  test('a server that never answers rejects after timeoutMs, saying there was no answer', async () => {
    await withServer(
      () => {},
      async (api) => {
        const started = Date.now();
        await assert.rejects(api.put('/actions', { action_type: 'InstanceStart' }, { signal: never, timeoutMs: 50 }), (error: unknown) => {
          assert.ok(error instanceof FirecrackerApiError);
          assert.equal(error.message, 'Firecracker refused PUT /actions: no answer within 0.05 s');
          assert.equal(error.status, undefined);
          return true;
        });
        const elapsed = Date.now() - started;
        assert.ok(elapsed >= 40 && elapsed < 1000, `rejected after ${elapsed} ms`);
      },
    );
  });

  test('a caller abort rejects with the signal reason', async () => {
    await withServer(
      () => {},
      async (api) => {
        const controller = new AbortController();
        const reason = new Error('interrupted');
        const call = api.get('/', { signal: controller.signal });
        setTimeout(() => controller.abort(reason), 10);
        await assert.rejects(call, (error) => error === reason);
      },
    );
  });

  test('an answer that starts but never ends also rejects after timeoutMs', async () => {
    await withServer(
      (_req, res) => {
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': 100 });
        res.write('{"partial":');
      },
      async (api) => {
        await assert.rejects(api.get('/', { signal: never, timeoutMs: 50 }), (error: unknown) => {
          assert.ok(error instanceof FirecrackerApiError);
          assert.equal(error.message, 'Firecracker refused GET /: no answer within 0.05 s');
          return true;
        });
      },
    );
  });

  test('an answer over 64 KiB rejects', async () => {
    await withServer(
      (_req, res) => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ padding: 'x'.repeat(70 * 1024) }));
      },
      async (api) => {
        await assert.rejects(api.get('/', { signal: never }), /answer to GET \/ is larger than 65536 bytes/);
      },
    );
  });

  test('an answer of exactly 64 KiB is still taken', async () => {
    const text = JSON.stringify({ padding: 'x'.repeat(64 * 1024 - 14) });
    assert.equal(Buffer.byteLength(text), 64 * 1024);
    await withServer(
      (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end(text),
      async (api) => {
        assert.deepEqual(await api.get('/', { signal: never }), JSON.parse(text));
      },
    );
  });

  test('a 204 resolves undefined; the request carries the JSON body and its headers', async () => {
    const seen: { method?: string; url?: string; type?: string; length?: string; body?: string }[] = [];
    await withServer(
      (req, res, body) => {
        seen.push({ method: req.method, url: req.url, type: req.headers['content-type'], length: req.headers['content-length'], body });
        res.writeHead(204).end();
      },
      async (api) => {
        assert.equal(await api.put('/drives/mvm0', { drive_id: 'mvm0', is_read_only: true }, { signal: never }), undefined);
        assert.equal(await api.patch('/vm', { state: 'Resumed' }, { signal: never }), undefined);
      },
    );
    const putBody = JSON.stringify({ drive_id: 'mvm0', is_read_only: true });
    assert.deepEqual(seen, [
      { method: 'PUT', url: '/drives/mvm0', type: 'application/json', length: String(putBody.length), body: putBody },
      { method: 'PATCH', url: '/vm', type: 'application/json', length: String(JSON.stringify({ state: 'Resumed' }).length), body: '{"state":"Resumed"}' },
    ]);
  });

  test('a 200 with JSON resolves the parsed body; a GET sends no body', async () => {
    const bodies: string[] = [];
    await withServer(
      (_req, res, body) => {
        bodies.push(body);
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"id":"vm","state":"Running","vmm_version":"1.16.0"}');
      },
      async (api) => {
        assert.deepEqual(await api.get('/', { signal: never }), { id: 'vm', state: 'Running', vmm_version: '1.16.0' });
      },
    );
    assert.deepEqual(bodies, ['']);
  });

  test('no server at the socket rejects with a FirecrackerApiError naming the call', async () => {
    const api = new FirecrackerApi(join(scratch, 'nobody.sock'));
    await assert.rejects(api.get('/', { signal: never }), (error: unknown) => {
      assert.ok(error instanceof FirecrackerApiError);
      assert.match(error.message, /^Firecracker refused GET \/: .*ENOENT/);
      return true;
    });
  });
});
