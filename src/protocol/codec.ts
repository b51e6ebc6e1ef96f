import {
  AgentType,
  ExecFlag,
  ExitKind,
  HEADER_SIZE,
  HostType,
  MAX_DATA,
  MAX_ENTROPY,
  MAX_PAYLOAD,
} from './constants.js';
import { InvalidRequestError, ProtocolError } from './errors.js';

/** Protocol strings are bytes (argv and env need not be UTF-8); a JS string is sent as UTF-8. */
export type Bytes = string | Uint8Array;

/** Host to agent. Decoded string fields are Buffers, so arbitrary bytes round-trip. */
export type HostMessage =
  | { type: 'hello'; version: number; hostTimeNs: bigint; entropy: Uint8Array }
  | {
      type: 'exec';
      timeoutMs: number;
      flags: number;
      cwd: Bytes;
      argv: readonly Bytes[];
      env: readonly Bytes[];
      /** Run on a pseudo-terminal of this size. The encoder sets the TTY flag from its presence; the decoder fills it when the flag is set. */
      tty?: TtySize;
      /** Sent, with the USER flag set, when present. */
      user?: ExecUser;
    }
  | { type: 'stdin'; data: Uint8Array }
  | { type: 'stdinEof' }
  | { type: 'signal'; signo: number }
  | { type: 'mount'; flags: number; device: Bytes; mountpoint: Bytes; fstype: Bytes }
  | { type: 'unmount'; mountpoint: Bytes }
  | { type: 'sync' }
  | { type: 'poweroff' }
  | ({ type: 'resize' } & TtySize);

/** A terminal's size; each is 1 to 65535. */
export interface TtySize {
  rows: number;
  cols: number;
}

/** Who an EXEC runs as; `gid` may be GID_OF_USER. */
export interface ExecUser {
  uid: number;
  gid: number;
}

/** Agent to host. The agent's strings are human text and are decoded as UTF-8. */
export type AgentMessage =
  | { type: 'hello'; version: number; capabilities: number; agentVersion: string }
  | { type: 'started'; pid: number }
  | { type: 'stdout'; data: Buffer }
  | { type: 'stderr'; data: Buffer }
  | { type: 'exit'; kind: ExitKind; code: number; message: string }
  | { type: 'ok' }
  | { type: 'error'; code: number; fatal: boolean; message: string }
  | { type: 'stdinAck'; bytes: number };

// ---------------------------------------------------------------------------------------------
// Encoding

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

// ---------------------------------------------------------------------------------------------
// Decoding

/** Bounds-checked cursor over one payload; every overrun is a ProtocolError, never a RangeError. */
class Reader {
  private off = 0;

  constructor(
    private readonly buf: Buffer,
    private readonly what: string,
  ) {}

  private take(n: number): number {
    if (this.buf.length - this.off < n) throw new ProtocolError(`${this.what} payload ends inside a field`);
    const at = this.off;
    this.off += n;
    return at;
  }
  get remaining(): number {
    return this.buf.length - this.off;
  }
  u8(): number {
    return this.buf[this.take(1)]!;
  }
  u16(): number {
    return this.buf.readUInt16BE(this.take(2));
  }
  u32(): number {
    return this.buf.readUInt32BE(this.take(4));
  }
  i32(): number {
    return this.buf.readInt32BE(this.take(4));
  }
  u64(): bigint {
    return this.buf.readBigUInt64BE(this.take(8));
  }
  bytes(n: number): Buffer {
    const at = this.take(n);
    return this.buf.subarray(at, at + n);
  }
  string(): Buffer {
    return this.bytes(this.u32());
  }
  /** A u32 count of strings, refused when the rest of the payload cannot hold that many length prefixes. */
  count(what: string): number {
    const n = this.u32();
    if (n > this.remaining / 4) throw new ProtocolError(`${this.what} ${what} ${n} is larger than the payload can hold`);
    return n;
  }
  end<T>(msg: T): T {
    if (this.off !== this.buf.length) {
      throw new ProtocolError(`${this.what} payload has ${this.buf.length - this.off} trailing bytes`);
    }
    return msg;
  }
}

export interface Direction<M> {
  /** Name of a type this direction carries, or undefined when the type is unknown. */
  name(type: number): string | undefined;
  parse(type: number, payload: Buffer): M;
}

function hex(type: number): string {
  return `0x${type.toString(16).padStart(2, '0')}`;
}

function parseExitKind(r: Reader): ExitKind {
  const kind = r.u8();
  if (kind > ExitKind.SPAWN_FAILED) throw new ProtocolError(`EXIT kind ${kind} is unknown`);
  return kind as ExitKind;
}

const agentNames: Record<number, string> = Object.fromEntries(Object.entries(AgentType).map(([k, v]) => [v, k]));
const hostNames: Record<number, string> = Object.fromEntries(Object.entries(HostType).map(([k, v]) => [v, k]));

const agentDirection: Direction<AgentMessage> = {
  name: (type) => agentNames[type],
  parse(type, payload) {
    const r = new Reader(payload, agentNames[type]!);
    switch (type) {
      case AgentType.HELLO:
        return r.end({ type: 'hello', version: r.u16(), capabilities: r.u32(), agentVersion: r.string().toString('utf8') });
      case AgentType.STARTED:
        return r.end({ type: 'started', pid: r.u32() });
      case AgentType.STDOUT:
        return { type: 'stdout', data: payload };
      case AgentType.STDERR:
        return { type: 'stderr', data: payload };
      case AgentType.EXIT: {
        const kind = parseExitKind(r);
        const code = r.i32();
        checkExitCode(kind, code);
        return r.end({ type: 'exit', kind, code, message: r.string().toString('utf8') });
      }
      case AgentType.OK:
        return r.end({ type: 'ok' });
      case AgentType.ERROR: {
        const code = r.u16();
        const fatal = r.u8();
        if (fatal > 1) throw new ProtocolError(`ERROR fatal must be 0 or 1, got ${fatal}`);
        return r.end({ type: 'error', code, fatal: fatal === 1, message: r.string().toString('utf8') });
      }
      default:
        return r.end({ type: 'stdinAck', bytes: r.u32() });
    }
  },
};

/**
 * The EXIT table of the spec, enforced so that the host's exit status always lies in 0–255 and
 * means what it says, whatever an untrusted guest sends.
 */
function checkExitCode(kind: ExitKind, code: number): void {
  const ok =
    kind === ExitKind.EXITED
      ? code >= 0 && code <= 255
      : kind === ExitKind.SPAWN_FAILED
        ? code === 126 || code === 127
        : code >= 1 && code <= 64;
  if (!ok) throw new ProtocolError(`EXIT kind ${kind} with code ${code} is out of range`);
}

function readSize(r: Reader, what: string): TtySize {
  const rows = r.u16();
  const cols = r.u16();
  if (rows < 1 || cols < 1) throw new ProtocolError(`${what} rows and cols must be at least 1, got ${rows}x${cols}`);
  return { rows, cols };
}

const hostDirection: Direction<HostMessage> = {
  name: (type) => hostNames[type],
  parse(type, payload) {
    const r = new Reader(payload, hostNames[type]!);
    switch (type) {
      case HostType.HELLO: {
        const version = r.u16();
        const hostTimeNs = r.u64();
        const n = r.u16();
        if (n > MAX_ENTROPY) throw new ProtocolError(`HELLO entropy length ${n} is over ${MAX_ENTROPY}`);
        return r.end({ type: 'hello', version, hostTimeNs, entropy: r.bytes(n) });
      }
      case HostType.EXEC: {
        const timeoutMs = r.u32();
        const flags = r.u32();
        const cwd = r.string();
        const argc = r.count('argc');
        if (argc === 0) throw new ProtocolError('EXEC argc is 0');
        const argv = Array.from({ length: argc }, () => r.string());
        const envc = r.count('envc');
        const env = Array.from({ length: envc }, () => r.string());
        const tty = flags & ExecFlag.TTY ? readSize(r, 'EXEC tty') : undefined;
        const user = flags & ExecFlag.USER ? { uid: r.u32(), gid: r.u32() } : undefined;
        return r.end({ type: 'exec', timeoutMs, flags, cwd, argv, env, ...(tty ? { tty } : {}), ...(user ? { user } : {}) });
      }
      case HostType.STDIN:
        return { type: 'stdin', data: payload };
      case HostType.STDIN_EOF:
        return r.end({ type: 'stdinEof' });
      case HostType.SIGNAL:
        return r.end({ type: 'signal', signo: r.u8() });
      case HostType.MOUNT:
        return r.end({ type: 'mount', flags: r.u32(), device: r.string(), mountpoint: r.string(), fstype: r.string() });
      case HostType.UNMOUNT:
        return r.end({ type: 'unmount', mountpoint: r.string() });
      case HostType.SYNC:
        return r.end({ type: 'sync' });
      case HostType.RESIZE:
        return r.end({ type: 'resize', ...readSize(r, 'RESIZE') });
      default:
        return r.end({ type: 'poweroff' });
    }
  },
};

const DATA_TYPES = new Set<number>([AgentType.STDOUT, AgentType.STDERR, HostType.STDIN]);

/**
 * Streaming frame decoder: push transport chunks in, get whole messages out. It buffers at most one
 * incomplete frame (HEADER_SIZE + MAX_PAYLOAD bytes), checks a header before reading its payload, and
 * hands out data payloads that lie whole inside a chunk as slices of it, without copying. The first
 * malformed frame throws a ProtocolError, and so does every push after it.
 */
export class MessageDecoder<M> {
  private readonly header = Buffer.alloc(HEADER_SIZE);
  private headerFilled = 0;
  /** Payload being assembled across chunks, allocated once its header has been checked. */
  private payload: Buffer | null = null;
  private payloadFilled = 0;
  private type = 0;
  private failure: ProtocolError | null = null;

  constructor(private readonly direction: Direction<M>) {}

  /** Bytes held for an incomplete frame; never more than HEADER_SIZE + MAX_PAYLOAD. */
  get bufferedBytes(): number {
    return this.headerFilled + this.payloadFilled;
  }

  push(chunk: Buffer): M[] {
    if (this.failure) throw this.failure;
    try {
      return this.decode(chunk);
    } catch (err) {
      this.failure = err instanceof ProtocolError ? err : new ProtocolError(`decoder failed: ${String(err)}`);
      this.headerFilled = 0;
      this.payload = null;
      this.payloadFilled = 0;
      throw this.failure;
    }
  }

  private decode(chunk: Buffer): M[] {
    const out: M[] = [];
    let off = 0;
    while (off < chunk.length) {
      if (this.payload) {
        const n = Math.min(this.payload.length - this.payloadFilled, chunk.length - off);
        chunk.copy(this.payload, this.payloadFilled, off, off + n);
        this.payloadFilled += n;
        off += n;
        if (this.payloadFilled === this.payload.length) {
          const payload = this.payload;
          this.payload = null;
          this.payloadFilled = 0;
          out.push(this.direction.parse(this.type, payload));
        }
        continue;
      }
      let length: number;
      if (this.headerFilled === 0 && chunk.length - off >= HEADER_SIZE) {
        length = chunk.readUInt32BE(off);
        this.type = chunk[off + 4]!;
        off += HEADER_SIZE;
      } else {
        const n = Math.min(HEADER_SIZE - this.headerFilled, chunk.length - off);
        chunk.copy(this.header, this.headerFilled, off, off + n);
        this.headerFilled += n;
        off += n;
        if (this.headerFilled < HEADER_SIZE) break;
        this.headerFilled = 0;
        length = this.header.readUInt32BE(0);
        this.type = this.header[4]!;
      }
      this.checkHeader(length);
      if (chunk.length - off >= length) {
        out.push(this.direction.parse(this.type, chunk.subarray(off, off + length)));
        off += length;
      } else {
        this.payload = Buffer.allocUnsafe(length);
      }
    }
    return out;
  }

  private checkHeader(length: number): void {
    const name = this.direction.name(this.type);
    if (name === undefined) throw new ProtocolError(`unknown message type ${hex(this.type)}`);
    if (length > MAX_PAYLOAD) throw new ProtocolError(`${name} frame announces ${length} bytes, over the ${MAX_PAYLOAD}-byte limit`);
    if (DATA_TYPES.has(this.type) && (length < 1 || length > MAX_DATA)) {
      throw new ProtocolError(`${name} frame carries ${length} bytes, outside 1 to ${MAX_DATA}`);
    }
  }
}

/** Decodes what the agent sends to the host. */
export class FrameDecoder extends MessageDecoder<AgentMessage> {
  constructor() {
    super(agentDirection);
  }
}

/** Decodes what the host sends to the agent: the agent's side, for tests and tools. */
export class HostFrameDecoder extends MessageDecoder<HostMessage> {
  constructor() {
    super(hostDirection);
  }
}
