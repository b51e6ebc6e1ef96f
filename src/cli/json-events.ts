/**
 * The events of `exec --json` and `console --json` (docs/json-events.md): one JSON object per
 * line, written in the order things happen, so that a caller can keep the command's two streams,
 * its result and mvmctl's own failure apart without parsing text.
 */
import { isUtf8 } from 'node:buffer';
import { Writable } from 'node:stream';
import type { Failure } from './failure.js';

/** Milliseconds since mvmctl started, whole numbers. */
export interface StartedTimings {
  /** exec only: the VM is up (booted or restored, directories mounted). */
  vmReadyMs?: number;
  commandStartedMs: number;
}

export type JsonEvent =
  | { type: 'started'; name: string; timings: StartedTimings }
  /** `data` is the chunk as UTF-8 text, or its bytes in base64 when they are not valid UTF-8. */
  | { type: 'stdout' | 'stderr'; data: string; encoding?: 'base64' }
  | { type: 'exit'; exitCode: number; signal?: string; timedOut: boolean; durationMs: { total: number } }
  | { type: 'error'; message: string; exitCode: number; details: string[] };

export class EventWriter {
  constructor(private readonly out: Writable) {}

  /** Writes one event as one line; `written` is called once `out` has taken it. */
  write(event: JsonEvent, written?: () => void): void {
    // An `out` that failed (a closed pipe) still calls back: its error is handled where it is emitted.
    this.out.write(`${JSON.stringify(event)}\n`, () => written?.());
  }

  /**
   * A Writable whose chunks become `type` events, one per chunk, each written before the next chunk
   * is taken (`out`'s pace holds the command back). A character split across chunks is held back
   * until its end arrives, so that it is not mistaken for invalid bytes.
   */
  output(type: 'stdout' | 'stderr'): Writable {
    const tail = new Utf8Tail();
    const emit = (bytes: Buffer, callback: () => void) => {
      if (bytes.length === 0) return callback();
      this.write(outputEvent(type, bytes), callback);
    };
    return new Writable({
      write: (chunk: Buffer, _encoding, callback) => emit(tail.take(chunk), () => callback()),
      // What is still held at the end never got its end: it goes out as the bytes it is.
      final: (callback) => emit(tail.held, () => callback()),
    });
  }
}

/** One chunk of output as an event: text when the bytes are valid UTF-8, else base64. */
export function outputEvent(type: 'stdout' | 'stderr', bytes: Buffer): JsonEvent {
  return isUtf8(bytes) ? { type, data: bytes.toString('utf8') } : { type, data: bytes.toString('base64'), encoding: 'base64' };
}

/** Holds back the start of a UTF-8 character that a chunk's end cut off, for the next chunk. */
class Utf8Tail {
  held = Buffer.alloc(0);

  /** The bytes of `chunk` (after what was held) up to the last character boundary. */
  take(chunk: Buffer): Buffer {
    const bytes = this.held.length > 0 ? Buffer.concat([this.held, chunk]) : chunk;
    const cut = bytes.length - incompleteUtf8Tail(bytes);
    this.held = Buffer.from(bytes.subarray(cut));
    return bytes.subarray(0, cut);
  }
}

/**
 * How many bytes at the end of `bytes` begin a UTF-8 character that is not complete yet: a lead
 * byte followed by fewer continuation bytes than it announces (0–3). Bytes no character can
 * complete count 0: they are sent as they are.
 */
export function incompleteUtf8Tail(bytes: Uint8Array): number {
  for (let back = 1; back <= Math.min(3, bytes.length); back++) {
    const byte = bytes[bytes.length - back]!;
    // A continuation byte (10xxxxxx): the lead is further back.
    if ((byte & 0xc0) === 0x80) continue;
    const length = byte >= 0xc2 && byte <= 0xdf ? 2 : byte >= 0xe0 && byte <= 0xef ? 3 : byte >= 0xf0 && byte <= 0xf4 ? 4 : 1;
    return length > back ? back : 0;
  }
  return 0;
}

/** The exit event of a command that ran. */
export function exitEvent(result: { exitCode: number; signal?: string; timedOut: boolean }): JsonEvent {
  return {
    type: 'exit',
    exitCode: result.exitCode,
    ...(result.signal ? { signal: result.signal } : {}),
    timedOut: result.timedOut,
    durationMs: { total: Math.round(performance.now()) },
  };
}

export function errorEvent(failure: Failure): JsonEvent {
  return { type: 'error', message: failure.message, exitCode: failure.exitCode, details: failure.details };
}
