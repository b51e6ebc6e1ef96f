/** The Firecracker backend's HTTP client (api.ts) against small stand-in servers: deadlines, size caps, error lines. */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { FirecrackerApi, FirecrackerApiError } from '../../src/backends/firecracker/api.js';
import { MvmError } from '../../src/errors.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-fc-api-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
let sockets = 0;
const socketPath = () => join(scratch, `s-${sockets++}.sock`);
const never = new AbortController().signal;


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
