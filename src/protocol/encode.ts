/** Host and agent messages to frames (docs/protocol.md); every value is checked before anything is written. */
import { AgentType, ExecFlag, HEADER_SIZE, HostType, MAX_DATA, MAX_ENTROPY, MAX_PAYLOAD } from './constants.js';
import { InvalidRequestError } from './errors.js';
import type { AgentMessage, Bytes, HostMessage, TtySize } from './messages.js';

function bytesOf(value: Bytes, what: string): Buffer {
  const buf =
    typeof value === 'string' ? Buffer.from(value, 'utf8') : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  if (buf.includes(0)) throw new InvalidRequestError(`${what} contains a NUL byte, which the protocol cannot carry`);
  return buf;
}

function checkUint(value: number, max: number, what: string): void {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new InvalidRequestError(`${what} must be an integer from 0 to ${max}, got ${value}`);
  }
}

function checkSize(size: TtySize, what: string): void {
  for (const k of ['rows', 'cols'] as const) {
    const v = size[k];
    if (!Number.isInteger(v) || v < 1 || v > 0xffff) throw new InvalidRequestError(`${what} ${k} must be an integer from 1 to 65535, got ${v}`);
  }
}

function checkData(data: Uint8Array, what: string): void {
  if (data.byteLength < 1 || data.byteLength > MAX_DATA) {
    throw new InvalidRequestError(`${what} data must be 1 to ${MAX_DATA} bytes, got ${data.byteLength}`);
  }
}

class Writer {
  readonly buf: Buffer;
  private off = HEADER_SIZE;

  constructor(type: number, payloadLength: number) {
    if (payloadLength > MAX_PAYLOAD) {
      throw new InvalidRequestError(
        `message of ${payloadLength} bytes is over the protocol's ${MAX_PAYLOAD}-byte limit (argv and env too large?)`,
      );
    }
    this.buf = Buffer.allocUnsafe(HEADER_SIZE + payloadLength);
    this.buf.writeUInt32BE(payloadLength, 0);
    this.buf[4] = type;
  }
  u8(v: number): this {
    this.buf[this.off++] = v;
    return this;
  }
  u16(v: number): this {
    this.off = this.buf.writeUInt16BE(v, this.off);
    return this;
  }
  u32(v: number): this {
    this.off = this.buf.writeUInt32BE(v, this.off);
    return this;
  }
  i32(v: number): this {
    this.off = this.buf.writeInt32BE(v, this.off);
    return this;
  }
  u64(v: bigint): this {
    this.off = this.buf.writeBigUInt64BE(v, this.off);
    return this;
  }
  raw(b: Uint8Array): this {
    this.buf.set(b, this.off);
    this.off += b.byteLength;
    return this;
  }
  string(b: Buffer): this {
    return this.u32(b.length).raw(b);
  }
  done(): Buffer {
    if (this.off !== this.buf.length) throw new Error(`codec bug: wrote ${this.off} of ${this.buf.length} bytes`);
    return this.buf;
  }
}

const empty = (type: number): Buffer => new Writer(type, 0).done();

/** Sum of the sizes of `strings` as protocol strings (u32 length prefix each). */
const stringsSize = (strings: readonly Buffer[]): number => strings.reduce((n, s) => n + 4 + s.length, 0);

/** One host-to-agent frame. Throws InvalidRequestError for values the protocol cannot carry. */
export function encodeFrame(msg: HostMessage): Buffer {
  switch (msg.type) {
    case 'hello': {
      checkUint(msg.version, 0xffff, 'HELLO version');
      if (msg.hostTimeNs < 0n || msg.hostTimeNs >= 1n << 64n) throw new InvalidRequestError('HELLO host_time_ns out of range');
      if (msg.entropy.byteLength > MAX_ENTROPY) {
        throw new InvalidRequestError(`HELLO entropy must be at most ${MAX_ENTROPY} bytes, got ${msg.entropy.byteLength}`);
      }
      return new Writer(HostType.HELLO, 2 + 8 + 2 + msg.entropy.byteLength)
        .u16(msg.version)
        .u64(msg.hostTimeNs)
        .u16(msg.entropy.byteLength)
        .raw(msg.entropy)
        .done();
    }
    case 'exec': {
      checkUint(msg.timeoutMs, 0xffffffff, 'EXEC timeout_ms');
      checkUint(msg.flags, 0xffffffff, 'EXEC flags');
      if (msg.user) {
        checkUint(msg.user.uid, 0xfffffffe, 'EXEC uid');
        checkUint(msg.user.gid, 0xffffffff, 'EXEC gid');
      }
      if (msg.argv.length === 0) throw new InvalidRequestError('EXEC needs at least one argv element');
      const cwd = bytesOf(msg.cwd, 'cwd');
      const argv = msg.argv.map((a, i) => bytesOf(a, `argv[${i}]`));
      const env = msg.env.map((e, i) => bytesOf(e, `env[${i}]`));
      if (msg.tty) checkSize(msg.tty, 'EXEC tty');
      // A flag that appends fields travels with them: it is derived from the field, never taken alone.
      let flags = msg.flags & ~(ExecFlag.TTY | ExecFlag.USER);
      if (msg.tty) flags |= ExecFlag.TTY;
      if (msg.user) flags |= ExecFlag.USER;
      const appended = (msg.tty ? 4 : 0) + (msg.user ? 8 : 0);
      const w = new Writer(HostType.EXEC, 4 + 4 + 4 + cwd.length + 4 + stringsSize(argv) + 4 + stringsSize(env) + appended);
      w.u32(msg.timeoutMs).u32(flags >>> 0).string(cwd).u32(argv.length);
      for (const a of argv) w.string(a);
      w.u32(env.length);
      for (const e of env) w.string(e);
      if (msg.tty) w.u16(msg.tty.rows).u16(msg.tty.cols);
      if (msg.user) w.u32(msg.user.uid).u32(msg.user.gid);
      return w.done();
    }
    case 'stdin':
      checkData(msg.data, 'STDIN');
      return new Writer(HostType.STDIN, msg.data.byteLength).raw(msg.data).done();
    case 'stdinEof':
      return empty(HostType.STDIN_EOF);
    case 'signal':
      checkUint(msg.signo, 0xff, 'SIGNAL signo');
      return new Writer(HostType.SIGNAL, 1).u8(msg.signo).done();
    case 'mount': {
      checkUint(msg.flags, 0xffffffff, 'MOUNT flags');
      const parts = [bytesOf(msg.device, 'device'), bytesOf(msg.mountpoint, 'mountpoint'), bytesOf(msg.fstype, 'fstype')];
      const w = new Writer(HostType.MOUNT, 4 + stringsSize(parts)).u32(msg.flags);
      for (const p of parts) w.string(p);
      return w.done();
    }
    case 'unmount': {
      const mp = bytesOf(msg.mountpoint, 'mountpoint');
      return new Writer(HostType.UNMOUNT, 4 + mp.length).string(mp).done();
    }
    case 'sync':
      return empty(HostType.SYNC);
    case 'poweroff':
      return empty(HostType.POWEROFF);
    case 'resize':
      checkSize(msg, 'RESIZE');
      return new Writer(HostType.RESIZE, 4).u16(msg.rows).u16(msg.cols).done();
  }
}

/** One agent-to-host frame: what the agent sends. The host needs it only to test against a fake agent. */
export function encodeAgentFrame(msg: AgentMessage): Buffer {
  switch (msg.type) {
    case 'hello': {
      const v = Buffer.from(msg.agentVersion, 'utf8');
      return new Writer(AgentType.HELLO, 2 + 4 + 4 + v.length).u16(msg.version).u32(msg.capabilities).string(v).done();
    }
    case 'started':
      return new Writer(AgentType.STARTED, 4).u32(msg.pid).done();
    case 'stdout':
    case 'stderr':
      checkData(msg.data, msg.type.toUpperCase());
      return new Writer(msg.type === 'stdout' ? AgentType.STDOUT : AgentType.STDERR, msg.data.length).raw(msg.data).done();
    case 'exit': {
      const m = Buffer.from(msg.message, 'utf8');
      return new Writer(AgentType.EXIT, 1 + 4 + 4 + m.length).u8(msg.kind).i32(msg.code).string(m).done();
    }
    case 'ok':
      return empty(AgentType.OK);
    case 'error': {
      const m = Buffer.from(msg.message, 'utf8');
      return new Writer(AgentType.ERROR, 2 + 1 + 4 + m.length).u16(msg.code).u8(msg.fatal ? 1 : 0).string(m).done();
    }
    case 'stdinAck':
      return new Writer(AgentType.STDIN_ACK, 4).u32(msg.bytes).done();
  }
}
