// Generated inputs for the host-side protocol fuzzer: valid frames (the shared vectors and encoder
// output), perturbed the ways a broken or hostile agent could, then cut into random transport chunks.
import { readFileSync } from 'node:fs';
import {
  encodeAgentFrame,
  encodeFrame,
  HEADER_SIZE,
  MAX_DATA,
  MAX_PAYLOAD,
  type AgentMessage,
  type HostMessage,
} from '../src/protocol/index.js';
import { below, pick, randomBytes, type Random } from './random.js';
import { repoRoot } from './paths.js';

export type Direction = 'g2h' | 'h2g';

/** Frames of one direction to build inputs from; `valid` are the ones a receiver must accept. */
export interface FramePool {
  valid: Buffer[];
  /** Valid frames plus the vectors a receiver must reject. */
  all: Buffer[];
}

/** One of every message an agent sends, edge values included: the seeds mutations start from. */
export const agentSamples: AgentMessage[] = [
  { type: 'hello', version: 1, capabilities: 0xf, agentVersion: 'mvm-agent 0.1.0' },
  { type: 'hello', version: 2, capabilities: 0, agentVersion: '' },
  { type: 'started', pid: 42 },
  { type: 'stdout', data: Buffer.from('hello\n') },
  { type: 'stdout', data: Buffer.alloc(MAX_DATA, 0x61) },
  { type: 'stderr', data: Buffer.alloc(3000, 0xab) },
  { type: 'exit', kind: 0, code: 7, message: '' },
  { type: 'exit', kind: 1, code: 9, message: '' },
  { type: 'exit', kind: 2, code: 9, message: '' },
  { type: 'exit', kind: 3, code: 127, message: 'exec "nope": No such file or directory' },
  { type: 'ok' },
  { type: 'error', code: 3, fatal: false, message: 'no' },
  { type: 'error', code: 2, fatal: true, message: 'version' },
  { type: 'stdinAck', bytes: 4 },
  { type: 'stdinAck', bytes: 65_536 },
];

/** One of every message the host sends. */
export const hostSamples: HostMessage[] = [
  { type: 'hello', version: 1, hostTimeNs: 123n, entropy: Buffer.alloc(32, 1) },
  { type: 'exec', timeoutMs: 3000, flags: 3, cwd: '/app', argv: ['sh', '-c', 'echo'], env: ['X=1', 'EMPTY='] },
  { type: 'stdin', data: Buffer.from('abc') },
  { type: 'stdinEof' },
  { type: 'signal', signo: 15 },
  { type: 'mount', flags: 1, device: '/dev/vdb', mountpoint: '/host', fstype: 'ext4' },
  { type: 'unmount', mountpoint: '/work' },
  { type: 'sync' },
  { type: 'poweroff' },
];

/** The shared vectors (docs/protocol-vectors/vectors.txt) and encoder output, per direction. */
export function loadFramePools(): Record<Direction, FramePool> {
  const pools: Record<Direction, FramePool> = {
    g2h: { valid: agentSamples.map(encodeAgentFrame), all: [] },
    h2g: { valid: hostSamples.map((m) => encodeFrame(m)), all: [] },
  };
  const invalid: Record<Direction, Buffer[]> = { g2h: [], h2g: [] };
  for (const line of readFileSync(`${repoRoot}docs/protocol-vectors/vectors.txt`, 'utf8').split('\n')) {
    const [, direction, expect, hex] = line.split(' ');
    if (line.startsWith('#') || (direction !== 'g2h' && direction !== 'h2g') || hex === undefined) continue;
    (expect === 'ok' ? pools[direction].valid : invalid[direction]).push(Buffer.from(hex, 'hex'));
  }
  for (const direction of ['g2h', 'h2g'] as const) pools[direction].all = [...pools[direction].valid, ...invalid[direction]];
  return pools;
}

const INTERESTING_LENGTHS = [0, 1, 2, 3, 4, 5, 0x7f, 0x80, 0xff, 0x100, 0xffff, MAX_DATA, MAX_DATA + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0x7fffffff, 0xffffffff];

function withLength(frame: Buffer, length: number): Buffer {
  if (frame.length >= 4) frame.writeUInt32BE(length >>> 0, 0);
  return frame;
}

/** The payload length a frame's bytes actually have, written into its header. */
function fixLength(frame: Buffer): Buffer {
  return withLength(frame, Math.max(0, frame.length - HEADER_SIZE));
}

/** One perturbation of a frame: the header (length, type) as well as the payload. */
export function mutateFrame(rand: Random, frame: Buffer, pool: FramePool): Buffer {
  const out = Buffer.from(frame);
  const at = () => below(rand, Math.max(1, out.length));
  switch (below(rand, 10)) {
    case 0: // bit flips anywhere
      for (let n = 1 + below(rand, 4); n > 0 && out.length > 0; n--) out[at()]! ^= 1 << below(rand, 8);
      return out;
    case 1: // random bytes anywhere
      for (let n = 1 + below(rand, 4); n > 0 && out.length > 0; n--) out[at()] = below(rand, 256);
      return out;
    case 2: // truncated, announcing its old length (an incomplete frame) or its new one
      return rand() < 0.5 ? out.subarray(0, at()) : fixLength(out.subarray(0, HEADER_SIZE + below(rand, Math.max(1, out.length - HEADER_SIZE))));
    case 3: // the length field: an interesting value, off by a little, or random
      if (rand() < 0.4) return withLength(out, pick(rand, INTERESTING_LENGTHS));
      if (rand() < 0.5 && out.length >= 4) return withLength(out, out.readUInt32BE(0) + below(rand, 7) - 3);
      return withLength(out, below(rand, 0x100000000));
    case 4: // another type, possibly the other direction's
      if (out.length > 4) out[4] = rand() < 0.5 ? below(rand, 256) : (out[4]! ^ 0x80);
      return out;
    case 5: // splice: this frame's head onto another frame's tail
      return Buffer.concat([out.subarray(0, at()), pick(rand, pool.all).subarray(below(rand, 16))]);
    case 6: { // bytes inserted into the payload, with or without a fixed-up length
      const cut = Math.min(out.length, HEADER_SIZE + below(rand, Math.max(1, out.length - HEADER_SIZE)));
      return maybeFix(rand, Buffer.concat([out.subarray(0, cut), randomBytes(rand, 1 + below(rand, 12)), out.subarray(cut)]));
    }
    case 7: { // a range deleted
      const from = at();
      return maybeFix(rand, Buffer.concat([out.subarray(0, from), out.subarray(from + 1 + below(rand, 8))]));
    }
    case 8: // a u32 inside the payload (a string length, a count, a code) set to an interesting value
      if (out.length >= HEADER_SIZE + 4) out.writeUInt32BE(pick(rand, INTERESTING_LENGTHS) >>> 0, HEADER_SIZE + below(rand, out.length - HEADER_SIZE - 3));
      return out;
    default: // trailing garbage inside the frame
      return fixLength(Buffer.concat([out, randomBytes(rand, 1 + below(rand, 4))]));
  }
}

function maybeFix(rand: Random, frame: Buffer): Buffer {
  return rand() < 0.5 ? fixLength(frame) : frame;
}

/**
 * A byte stream from `script` (frames in the order a well-behaved peer sends them): most frames
 * kept, others mutated, dropped, repeated, replaced by an unexpected valid frame, or preceded by
 * noise. `pristine` says the stream is exactly the script, so a receiver must accept all of it.
 */
export function perturbScript(rand: Random, script: readonly Buffer[], pool: FramePool): { bytes: Buffer; pristine: boolean } {
  if (rand() < 0.25) return { bytes: Buffer.concat(script), pristine: true };
  const parts: Buffer[] = [];
  let pristine = true;
  for (const frame of script) {
    const r = rand();
    if (r < 0.6) {
      parts.push(frame);
      continue;
    }
    pristine = false;
    if (r < 0.8) parts.push(mutateFrame(rand, frame, pool));
    else if (r < 0.85) continue;
    else if (r < 0.9) parts.push(frame, frame);
    else if (r < 0.95) parts.push(pick(rand, pool.all));
    else parts.push(randomBytes(rand, below(rand, 64)), frame);
  }
  return { bytes: Buffer.concat(parts), pristine };
}

/** 1 to 8 frames of the pool, perturbed: an input for a bare decoder. */
export function decoderInput(rand: Random, pool: FramePool): { bytes: Buffer; pristine: boolean } {
  const script = Array.from({ length: 1 + below(rand, 8) }, () => pick(rand, pool.valid));
  return perturbScript(rand, script, pool);
}

/** Cuts a stream the ways a transport may: whole, byte by byte, in small pieces, or in large ones. */
export function chunked(rand: Random, bytes: Buffer): Buffer[] {
  const mode = below(rand, 4);
  if (mode === 0 || bytes.length === 0) return [bytes];
  const chunks: Buffer[] = [];
  // Tiny pieces matter around headers and fields; a 64 KiB payload cut into thousands of them costs
  // as much as thousands of other inputs, so a stream is cut into a few hundred pieces at most.
  const most = Math.max(mode === 1 ? 1 : mode === 2 ? 16 : 70_000, Math.ceil(bytes.length / 256));
  for (let off = 0; off < bytes.length; ) {
    const n = 1 + below(rand, Math.min(most, bytes.length - off));
    chunks.push(bytes.subarray(off, off + n));
    off += n;
  }
  return chunks;
}
