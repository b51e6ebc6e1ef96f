import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import {
  encodeAgentFrame,
  encodeFrame,
  FrameDecoder,
  HostFrameDecoder,
  InvalidRequestError,
  MAX_PAYLOAD,
  ProtocolError,
  type AgentMessage,
  type HostMessage,
} from '../../src/protocol/index.js';

// dist/test/unit/<this file> is three levels below the repository root.
const root = fileURLToPath(new URL('../../../', import.meta.url));

interface Vector {
  name: string;
  direction: 'h2g' | 'g2h';
  expect: 'ok' | 'error';
  bytes: Buffer;
}

const vectors: Vector[] = readFileSync(`${root}docs/protocol-vectors/vectors.txt`, 'utf8')
  .split('\n')
  .filter((line) => line.trim() !== '' && !line.startsWith('#'))
  .map((line) => {
    const [name, direction, expect, hex] = line.split(' ');
    assert.ok(direction === 'h2g' || direction === 'g2h', line.slice(0, 80));
    assert.ok(expect === 'ok' || expect === 'error', line.slice(0, 80));
    return { name: name!, direction, expect, bytes: Buffer.from(hex!, 'hex') };
  });

const b = (s: string): Buffer => Buffer.from(s, 'utf8');

/** The message each host-to-agent `ok` vector's description names. */
const hostMessages: Record<string, HostMessage> = {
  hello_host: { type: 'hello', version: 1, hostTimeNs: 1764455919123456789n, entropy: Buffer.from([1, 2, 3, 4]) },
  exec_simple: { type: 'exec', timeoutMs: 0, flags: 0, cwd: '', argv: ['true'], env: [] },
  exec_full: { type: 'exec', timeoutMs: 3000, flags: 3, cwd: '/app', argv: ['sh', '-c', 'echo "$X" é'], env: ['X=1', 'EMPTY='] },
  exec_empty_arg: { type: 'exec', timeoutMs: 0, flags: 0, cwd: '', argv: ['printf', ''], env: [] },
  exec_user: { type: 'exec', timeoutMs: 0, flags: 8, cwd: '/tmp', argv: ['id'], env: [], user: { uid: 1000, gid: 100 } },
  exec_user_primary_gid: { type: 'exec', timeoutMs: 0, flags: 8, cwd: '', argv: ['id'], env: [], user: { uid: 65534, gid: 0xffffffff } },
  exec_tty_user: { type: 'exec', timeoutMs: 0, flags: 12, cwd: '', argv: ['sh'], env: [], tty: { rows: 30, cols: 100 }, user: { uid: 1000, gid: 1000 } },
  exec_tty: { type: 'exec', timeoutMs: 0, flags: 4, cwd: '', argv: ['sh'], env: [], tty: { rows: 30, cols: 100 } },
  resize: { type: 'resize', rows: 40, cols: 120 },
  stdin: { type: 'stdin', data: b('abc\n') },
  stdin_eof: { type: 'stdinEof' },
  signal_term: { type: 'signal', signo: 15 },
  mount_ro: { type: 'mount', flags: 1, device: '/dev/vdb', mountpoint: '/host', fstype: 'ext4' },
  unmount: { type: 'unmount', mountpoint: '/work' },
  sync: { type: 'sync' },
  poweroff: { type: 'poweroff' },
};

/** The message each agent-to-host `ok` vector's description names. */
const agentMessages: Record<string, AgentMessage> = {
  hello_agent: { type: 'hello', version: 1, capabilities: 0xf, agentVersion: 'mvm-agent 0.1.0' },
  started: { type: 'started', pid: 42 },
  stdout: { type: 'stdout', data: b('hello\n') },
  stderr_binary: { type: 'stderr', data: Buffer.from([0x00, 0xff, 0x0a, 0x0d]) },
  exit_code7: { type: 'exit', kind: 0, code: 7, message: '' },
  exit_signal9: { type: 'exit', kind: 1, code: 9, message: '' },
  exit_timeout: { type: 'exit', kind: 2, code: 9, message: '' },
  exit_notfound: { type: 'exit', kind: 3, code: 127, message: 'exec "nope": No such file or directory' },
  ok: { type: 'ok' },
  error_exec_unavailable: {
    type: 'error',
    code: 3,
    fatal: false,
    message: 'exec is not available in this image (agent built without dev shell)',
  },
  stdin_ack: { type: 'stdinAck', bytes: 4 },
};

/** Decoded string fields are Buffers; compare them with what the test wrote as JS strings. */
function normalise(msg: object): unknown {
  return JSON.parse(
    JSON.stringify(msg, (_key, value: unknown) => {
      if (typeof value === 'bigint') return `${value}n`;
      if (value && typeof value === 'object' && (value as { type?: string }).type === 'Buffer') {
        return Buffer.from((value as { data: number[] }).data).toString('hex');
      }
      if (value instanceof Uint8Array) return Buffer.from(value).toString('hex');
      if (typeof value === 'string' && _key !== 'type') return Buffer.from(value).toString('hex');
      return value;
    }),
  );
}

function decodeAll(direction: 'h2g' | 'g2h', bytes: Buffer, chunkSize = bytes.length): unknown[] {
  const decoder = direction === 'g2h' ? new FrameDecoder() : new HostFrameDecoder();
  const out: unknown[] = [];
  for (let i = 0; i < bytes.length; i += chunkSize) out.push(...decoder.push(bytes.subarray(i, i + chunkSize)));
  assert.equal(decoder.bufferedBytes, 0);
  return out;
}

describe('protocol vectors', () => {
  it('covers every ok vector with a message', () => {
    for (const v of vectors.filter((v) => v.expect === 'ok')) {
      const table = v.direction === 'h2g' ? hostMessages : agentMessages;
      assert.ok(v.name in table, `no message for vector ${v.name}`);
    }
    assert.ok(vectors.length >= 40);
  });

  for (const v of vectors) {
    it(`${v.name} (${v.direction} ${v.expect})`, () => {
      if (v.expect === 'error') {
        assert.throws(() => decodeAll(v.direction, v.bytes), ProtocolError);
        assert.throws(() => decodeAll(v.direction, v.bytes, 1), ProtocolError);
        return;
      }
      if (v.direction === 'h2g') {
        const msg = hostMessages[v.name]!;
        assert.equal(encodeFrame(msg).toString('hex'), v.bytes.toString('hex'));
        assert.deepEqual(normalise(decodeAll('h2g', v.bytes)[0] as object), normalise(msg));
      } else {
        const msg = agentMessages[v.name]!;
        assert.equal(encodeAgentFrame(msg).toString('hex'), v.bytes.toString('hex'));
        assert.deepEqual(normalise(decodeAll('g2h', v.bytes)[0] as object), normalise(msg));
      }
      const whole = decodeAll(v.direction, v.bytes);
      assert.equal(whole.length, 1);
      assert.deepEqual(normalise(decodeAll(v.direction, v.bytes, 1) as object), normalise(whole as object));
    });
  }
});

describe('FrameDecoder', () => {
  const okG2h = vectors.filter((v) => v.direction === 'g2h' && v.expect === 'ok');
  const stream = Buffer.concat(okG2h.map((v) => v.bytes));

  it('decodes a stream of frames identically for any chunking', () => {
    const whole = normalise(decodeAll('g2h', stream) as object);
    assert.equal((whole as unknown[]).length, okG2h.length);
    for (const size of [1, 2, 3, 5, 7, 13, 64]) assert.deepEqual(normalise(decodeAll('g2h', stream, size) as object), whole);
  });

  it('hands out STDOUT data as a slice of the chunk, not a copy', () => {
    const frame = encodeAgentFrame({ type: 'stdout', data: Buffer.alloc(1000, 7) });
    const [msg] = new FrameDecoder().push(frame);
    assert.equal(msg?.type, 'stdout');
    if (msg?.type === 'stdout') assert.equal(msg.data.buffer, frame.buffer);
  });

  it('rejects an oversized header before any payload arrives', () => {
    const d = new FrameDecoder();
    const header = Buffer.alloc(5);
    header.writeUInt32BE(MAX_PAYLOAD + 1, 0);
    header[4] = 0x81;
    assert.throws(() => d.push(header), ProtocolError);
    // The decoder stays failed: a broken stream cannot resynchronise.
    assert.throws(() => d.push(encodeAgentFrame({ type: 'ok' })), ProtocolError);
  });

  it('refuses a STDOUT header announcing more than one data frame, before the payload', () => {
    assert.throws(() => new FrameDecoder().push(Buffer.from('0001000183', 'hex')), /STDOUT frame carries 65537 bytes/);
  });

  it('refuses the EXIT codes the spec does not allow', () => {
    for (const [kind, code] of [
      [0, 256],
      [0, -1],
      [1, 0],
      [1, 65],
      [2, 0],
      [3, 1],
    ] as const) {
      const frame = Buffer.from(encodeAgentFrame({ type: 'exit', kind: 0, code: 0, message: '' }));
      frame[5] = kind;
      frame.writeInt32BE(code, 6);
      assert.throws(() => new FrameDecoder().push(frame), ProtocolError, `kind ${kind} code ${code}`);
    }
  });

  it('refuses ERROR with fatal other than 0/1', () => {
    const frame = Buffer.from(encodeAgentFrame({ type: 'error', code: 6, fatal: false, message: 'x' }));
    frame[7] = 2;
    assert.throws(() => new FrameDecoder().push(frame), /fatal must be 0 or 1/);
  });
});

describe('encodeFrame', () => {
  it('sets the TTY flag from the tty field, never without it', () => {
    const withTty = encodeFrame({ type: 'exec', timeoutMs: 0, flags: 0, cwd: '', argv: ['sh'], env: [], tty: { rows: 30, cols: 100 } });
    const exec = new HostFrameDecoder().push(withTty)[0] as Extract<HostMessage, { type: 'exec' }>;
    assert.equal(exec.flags, 4);
    assert.deepEqual(exec.tty, { rows: 30, cols: 100 });
    const without = encodeFrame({ type: 'exec', timeoutMs: 0, flags: 4, cwd: '', argv: ['sh'], env: [] });
    const plain = new HostFrameDecoder().push(without)[0] as Extract<HostMessage, { type: 'exec' }>;
    assert.equal(plain.flags, 0);
    assert.equal(plain.tty, undefined);
  });

  it('refuses terminal sizes outside 1 to 65535', () => {
    const exec = (rows: number, cols: number): HostMessage => ({ type: 'exec', timeoutMs: 0, flags: 0, cwd: '', argv: ['sh'], env: [], tty: { rows, cols } });
    assert.throws(() => encodeFrame(exec(0, 80)), InvalidRequestError);
    assert.throws(() => encodeFrame(exec(24, 65536)), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'resize', rows: 24, cols: 0 }), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'resize', rows: 1.5, cols: 80 }), InvalidRequestError);
  });

  it('refuses NUL bytes in strings', () => {
    assert.throws(() => encodeFrame({ type: 'exec', timeoutMs: 0, flags: 0, cwd: '', argv: ['a\0b'], env: [] }), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'unmount', mountpoint: '/x\0' }), InvalidRequestError);
  });

  it('refuses an empty argv, bad numbers and oversized frames', () => {
    assert.throws(() => encodeFrame({ type: 'exec', timeoutMs: 0, flags: 0, cwd: '', argv: [], env: [] }), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'exec', timeoutMs: -1, flags: 0, cwd: '', argv: ['x'], env: [] }), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'signal', signo: 256 }), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'stdin', data: Buffer.alloc(0) }), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'stdin', data: Buffer.alloc(65537) }), InvalidRequestError);
    assert.throws(() => encodeFrame({ type: 'hello', version: 1, hostTimeNs: 0n, entropy: Buffer.alloc(257) }), InvalidRequestError);
    const big = 'x'.repeat(600_000);
    assert.throws(() => encodeFrame({ type: 'exec', timeoutMs: 0, flags: 0, cwd: '', argv: [big, big], env: [] }), /over the protocol/);
  });

  it('round-trips arbitrary bytes in argv and env', () => {
    const arg = Buffer.from([0xff, 0xfe, 0x01, 0x80]);
    const frame = encodeFrame({ type: 'exec', timeoutMs: 5, flags: 1, cwd: Buffer.from([0xc3]), argv: [arg, ''], env: [b('A=\u00e9')] });
    const [msg] = new HostFrameDecoder().push(frame);
    assert.ok(msg?.type === 'exec');
    assert.deepEqual(
      msg.argv.map((a) => Buffer.from(a as Uint8Array).toString('hex')),
      ['fffe0180', ''],
    );
    assert.equal(Buffer.from(msg.env[0] as Uint8Array).toString('utf8'), 'A=\u00e9');
    assert.equal(msg.timeoutMs, 5);
  });
});
