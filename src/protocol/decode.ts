/** Frames to messages (docs/protocol.md): a streaming decoder that never buffers more than one frame. */
import { AgentType, ExecFlag, ExitKind, HEADER_SIZE, HostType, MAX_DATA, MAX_ENTROPY, MAX_PAYLOAD } from './constants.js';
import { ProtocolError } from './errors.js';
import type { AgentMessage, HostMessage, TtySize } from './messages.js';

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
