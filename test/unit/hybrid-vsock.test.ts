/**
 * The host side of Firecracker's hybrid vsock (`CONNECT <port>\n` / `OK <n>\n` on a unix socket),
 * against a stand-in VMM: a net server on a unix socket that answers as Firecracker does, or not.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { connectHybridVsock, type HybridConnectOptions } from '../../src/backends/vsock/hybrid.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-hybrid-vsock-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
let sockets = 0;
const PORT = 5252;

function socketPath(): string {
  return join(scratch, `v-${sockets++}.sock`);
}

function options(overrides: Partial<HybridConnectOptions> = {}): HybridConnectOptions {
  return {
    signal: AbortSignal.timeout(5_000),
    gone: () => false,
    goneError: () => new Error('the VMM is gone'),
    retryMs: 2,
    ...overrides,
  };
}

/** What a stand-in VMM does with each connection, given the CONNECT line it read and its index. */
type Handler = (socket: Socket, line: string, index: number) => void;

interface Vmm {
  server: Server;
  /** The CONNECT lines received, one per connection that sent one. */
  lines: string[];
  connections: number;
  close(): Promise<void>;
}

/** Serves `path`; each connection's first line goes to `handler` (a connection may also be handled at once, see `onConnection`). */
function serve(path: string, handler: Handler, onConnection?: (socket: Socket, index: number) => boolean): Promise<Vmm> {
  const open = new Set<Socket>();
  const vmm: Vmm = {
    server: createServer((socket) => {
      const index = vmm.connections++;
      open.add(socket);
      socket.on('close', () => open.delete(socket));
      socket.on('error', () => {});
      if (onConnection?.(socket, index)) return;
      let received = '';
      const onData = (chunk: Buffer) => {
        received += chunk.toString('latin1');
        const newline = received.indexOf('\n');
        if (newline < 0) return;
        socket.off('data', onData);
        vmm.lines.push(received.slice(0, newline + 1));
        handler(socket, received.slice(0, newline + 1), index);
      };
      socket.on('data', onData);
    }),
    lines: [],
    connections: 0,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of open) socket.destroy();
        vmm.server.close(() => resolve());
      }),
  };
  return new Promise((resolve, reject) => {
    vmm.server.once('error', reject);
    vmm.server.listen(path, () => resolve(vmm));
  });
}

const ok: Handler = (socket) => socket.write('OK 1073741824\n');

/** Everything the socket yields until it ends. */
function readAll(socket: Socket): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    socket.on('data', (chunk: Buffer) => (text += chunk.toString('latin1')));
    socket.on('end', () => resolve(text));
    socket.on('error', reject);
  });
}

describe('hybrid vsock: connecting', () => {
  test('a socket that does not exist yet is retried until the VMM creates it', async () => {
    const path = socketPath();
    let checks = 0;
    let vmm: Promise<Vmm> | undefined;
    // gone() is asked before every attempt: the second ask means the first attempt failed (ENOENT).
    const gone = () => {
      if (++checks === 2) vmm = serve(path, ok);
      return false;
    };
    const socket = await connectHybridVsock(path, PORT, options({ gone }));
    try {
      assert.ok(checks >= 2, `expected a retry, got ${checks} attempts`);
      assert.ok(vmm);
      assert.deepEqual((await vmm).lines, [`CONNECT ${PORT}\n`]);
    } finally {
      socket.destroy();
      await (await vmm!).close();
    }
  });

  test('connections the VMM closes without an answer (guest not listening yet) are retried', async () => {
    const path = socketPath();
    // The first connection is closed at once, the next two once their CONNECT arrived, as
    // Firecracker does while nobody listens on the guest port; the fourth is answered.
    const vmm = await serve(
      path,
      (socket, line, index) => (index < 3 ? socket.destroy() : ok(socket, line, index)),
      (socket, index) => {
        if (index !== 0) return false;
        socket.destroy();
        return true;
      },
    );
    try {
      const socket = await connectHybridVsock(path, PORT, options());
      socket.destroy();
      assert.equal(vmm.connections, 4);
      assert.deepEqual(vmm.lines, [`CONNECT ${PORT}\n`, `CONNECT ${PORT}\n`, `CONNECT ${PORT}\n`]);
    } finally {
      await vmm.close();
    }
  });

  test('the port is sent as asked', async () => {
    const path = socketPath();
    const vmm = await serve(path, ok);
    try {
      (await connectHybridVsock(path, 1024, options())).destroy();
      assert.deepEqual(vmm.lines, ['CONNECT 1024\n']);
    } finally {
      await vmm.close();
    }
  });

  test('a socket file nobody serves (ECONNREFUSED) is retried until gone() says stop', async () => {
    const path = socketPath();
    writeFileSync(path, ''); // Not a socket: connect() is refused.
    let checks = 0;
    const goneError = new Error('exited');
    await assert.rejects(
      connectHybridVsock(path, PORT, options({ gone: () => ++checks > 3, goneError: () => goneError })),
      (error) => error === goneError,
    );
    assert.equal(checks, 4);
  });
});

describe('hybrid vsock: the stream after OK', () => {
  test('bytes after the OK line in the same write reach the consumer first, once it resumes', async () => {
    const path = socketPath();
    const vmm = await serve(path, (socket) => {
      socket.write('OK 1073741824\nHELLO from the guest');
      // More only once the host spoke: the extra bytes above must not depend on timing.
      socket.once('data', () => socket.end(' and more'));
    });
    try {
      const socket = await connectHybridVsock(path, PORT, options());
      assert.equal(socket.isPaused(), true, 'the socket is handed over paused');
      let first: string | undefined;
      socket.once('data', (chunk: Buffer) => (first = chunk.toString('latin1')));
      const all = readAll(socket);
      // Paused: listeners alone must not start the flow.
      await new Promise((resolve) => setImmediate(resolve));
      assert.equal(first, undefined);
      socket.resume();
      socket.write('ping');
      assert.equal(await all, 'HELLO from the guest and more');
      assert.equal(first, 'HELLO from the guest');
      socket.destroy();
    } finally {
      await vmm.close();
    }
  });

  test('an OK line split across writes is still read, and nothing after it is lost', async () => {
    const path = socketPath();
    const vmm = await serve(path, (socket) => {
      socket.write('OK 10');
      setTimeout(() => socket.end('73741824\nrest'), 5);
    });
    try {
      const socket = await connectHybridVsock(path, PORT, options());
      const all = readAll(socket);
      socket.resume();
      assert.equal(await all, 'rest');
      socket.destroy();
    } finally {
      await vmm.close();
    }
  });

  test('with nothing after OK, the consumer gets only what the guest sends later', async () => {
    const path = socketPath();
    const vmm = await serve(path, (socket) => {
      socket.write('OK 1\n');
      socket.once('data', (chunk) => socket.end(chunk));
    });
    try {
      const socket = await connectHybridVsock(path, PORT, options());
      const all = readAll(socket);
      socket.resume();
      socket.write('echo');
      assert.equal(await all, 'echo');
      socket.destroy();
    } finally {
      await vmm.close();
    }
  });
});

describe('hybrid vsock: answers that are not OK', () => {
  test('a wrong answer rejects, naming what was answered, without retrying', async () => {
    const path = socketPath();
    const vmm = await serve(path, (socket) => socket.write('NOPE\n'));
    try {
      await assert.rejects(connectHybridVsock(path, PORT, options()), (error: Error) => {
        assert.match(error.message, /'NOPE'/);
        assert.match(error.message, new RegExp(`CONNECT ${PORT}`));
        assert.ok(error.message.includes(path));
        return true;
      });
      assert.equal(vmm.connections, 1);
    } finally {
      await vmm.close();
    }
  });

  test('an OK without a port number is refused', async () => {
    const path = socketPath();
    const vmm = await serve(path, (socket) => socket.write('OK \n'));
    try {
      await assert.rejects(connectHybridVsock(path, PORT, options()), /answered CONNECT 5252 with 'OK '/);
    } finally {
      await vmm.close();
    }
  });

  test('more than 32 bytes without a newline rejects', async () => {
    const path = socketPath();
    const vmm = await serve(path, (socket) => socket.write('x'.repeat(40)));
    try {
      await assert.rejects(connectHybridVsock(path, PORT, options()), /answered CONNECT with something other than OK/);
      assert.equal(vmm.connections, 1);
    } finally {
      await vmm.close();
    }
  });

  test('a long wrong line is shown cut to 32 characters', async () => {
    const path = socketPath();
    const vmm = await serve(path, (socket) => socket.write(`${'y'.repeat(20)}\n`));
    try {
      await assert.rejects(connectHybridVsock(path, PORT, options()), (error: Error) => error.message.endsWith(`'${'y'.repeat(20)}'`));
    } finally {
      await vmm.close();
    }
  });
});

describe('hybrid vsock: stopping', () => {
  test('gone() at the start rejects with goneError() and connects nowhere', async () => {
    const path = socketPath();
    const vmm = await serve(path, ok);
    const goneError = new Error('Firecracker exited');
    try {
      await assert.rejects(
        connectHybridVsock(path, PORT, options({ gone: () => true, goneError: () => goneError })),
        (error) => error === goneError,
      );
      assert.equal(vmm.connections, 0);
    } finally {
      await vmm.close();
    }
  });

  test('gone() turning true between retries rejects with goneError()', async () => {
    const path = socketPath(); // Never created.
    let checks = 0;
    const goneError = new Error('Firecracker exited');
    await assert.rejects(
      connectHybridVsock(path, PORT, options({ gone: () => ++checks === 3, goneError: () => goneError })),
      (error) => error === goneError,
    );
    assert.equal(checks, 3);
  });

  test('an aborted signal rejects with its reason and connects nowhere', async () => {
    const path = socketPath();
    const vmm = await serve(path, ok);
    const reason = new Error('interrupted');
    try {
      await assert.rejects(connectHybridVsock(path, PORT, options({ signal: AbortSignal.abort(reason) })), (error) => error === reason);
      assert.equal(vmm.connections, 0);
    } finally {
      await vmm.close();
    }
  });

  test('an abort while waiting for the answer rejects with its reason and closes the connection', async () => {
    const path = socketPath();
    const controller = new AbortController();
    const reason = new Error('interrupted');
    let closed!: Promise<void>;
    // The VMM never answers; the abort comes once the CONNECT arrived.
    const vmm = await serve(path, (socket) => {
      closed = new Promise((resolve) => socket.on('close', () => resolve()));
      controller.abort(reason);
    });
    try {
      await assert.rejects(connectHybridVsock(path, PORT, options({ signal: controller.signal })), (error) => error === reason);
      await closed;
      assert.equal(vmm.connections, 1);
    } finally {
      await vmm.close();
    }
  });

  test('an abort while waiting to retry stops at once, rejecting with its reason', async () => {
    const path = socketPath();
    const controller = new AbortController();
    const reason = new Error('interrupted');
    let checks = 0;
    const gone = () => {
      if (++checks === 1) setTimeout(() => controller.abort(reason), 20);
      return false;
    };
    const started = Date.now();
    await assert.rejects(connectHybridVsock(path, PORT, options({ signal: controller.signal, gone, retryMs: 60_000 })), (error) => error === reason);
    assert.equal(checks, 1, 'stopped without another attempt');
    assert.ok(Date.now() - started < 10_000, 'stopped before the retry was due');
  });
});
