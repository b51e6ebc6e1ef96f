// A flood of guest stdout into a reader that stalls first and then reads as fast as it can, while
// mvmctl's own memory is watched: backpressure must hold end to end, and every byte arrive in order.
import { createHash } from 'node:crypto';
import type { LaunchMvmctl } from './launch.js';
import { rssBytes } from './procs.js';

const MB = 1_000_000;
const GiB = 1024 ** 3;
export const FLOOD_RSS_LIMIT_BYTES = 100 * MB;
const SAMPLE_MS = 100;

/**
 * One line of the stream, repeated by the guest's `yes`. Its length with the newline, 4099, is
 * prime: output chunks are sized in powers of two, so a chunk lost, repeated or delivered out of
 * order shifts the pattern and changes the checksum, unless it were a multiple of 4099 bytes.
 */
const ALPHABET = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
const LINE = Array.from({ length: 4098 }, (_, i) => ALPHABET[(i * 7 + (i >> 6)) % ALPHABET.length]).join('');

/** sha256 of the first `bytes` bytes of `yes LINE`, computed here the way the guest produces them. */
export function expectedFloodDigest(bytes: number): string {
  const block = Buffer.from(`${LINE}\n`.repeat(256));
  const hash = createHash('sha256');
  for (let left = bytes; left > 0; left -= block.length) hash.update(left >= block.length ? block : block.subarray(0, left));
  return hash.digest('hex');
}

export interface FloodOptions {
  launch: LaunchMvmctl;
  env: NodeJS.ProcessEnv;
  /** Rounded up to whole 64 KiB blocks. */
  bytes: number;
  /** How long the reader does not read at first. */
  stallMs: number;
}

export interface FloodReport {
  bytes: number;
  received: number;
  stallMs: number;
  /** From the end of the stall to mvmctl's exit. */
  readSeconds: number;
  peakRssBytes: number;
  checksumOk: boolean;
  exit: string;
  /** mvmctl's last stderr lines when it did not exit 0. */
  stderrTail: string;
  ok: boolean;
}

/** The guest writes in blocks of this size: busybox `head -c` copies in small reads, which under TCG costs 3x. */
const BLOCK = 65_536;

export async function flood(options: FloodOptions): Promise<FloodReport> {
  const { stallMs } = options;
  const blocks = Math.ceil(options.bytes / BLOCK);
  const bytes = blocks * BLOCK;
  const expected = expectedFloodDigest(bytes);
  // At 10 MB/s (slow TCG), with room for the stall and the boot.
  const timeoutSeconds = Math.max(300, Math.ceil(bytes / (10 * MB)));
  const child = options.launch(
    ['exec', '--memory', '256M', '--timeout', String(timeoutSeconds), '--',
      'sh', '-c', `yes "$0" | dd bs=${BLOCK} count="$1" iflag=fullblock 2>/dev/null`, LINE, String(blocks)],
    options.env,
  );
  // Nothing is read until the stall is over: the pipe fills, and mvmctl must stop reading the guest.
  child.stdout!.pause();
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString('utf8')).slice(-4000)));
  let peakRssBytes = 0;
  const sampler = setInterval(() => (peakRssBytes = Math.max(peakRssBytes, rssBytes(child.pid!) ?? 0)), SAMPLE_MS);
  const hash = createHash('sha256');
  let received = 0;
  let readFrom = 0;
  const startReading = () => {
    if (readFrom) return;
    readFrom = performance.now();
    // A stream paused explicitly stays paused when a 'data' listener comes: resume() it.
    child.stdout!.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      received += chunk.length;
    }).resume();
  };
  const stall = setTimeout(startReading, stallMs);
  // An mvmctl that fails early would otherwise wait for a stdout nobody reads.
  child.on('exit', startReading);
  const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('close', (code, signal) => resolve({ code, signal })),
  );
  clearTimeout(stall);
  clearInterval(sampler);
  const checksumOk = received === bytes && hash.digest('hex') === expected;
  const exitText = exit.signal ? `killed by ${exit.signal}` : `exit ${exit.code}`;
  return {
    bytes,
    received,
    stallMs,
    readSeconds: (performance.now() - readFrom) / 1000,
    peakRssBytes,
    checksumOk,
    exit: exitText,
    stderrTail: exit.code === 0 ? '' : stderr.trim().split('\n').slice(-3).join(' | '),
    ok: exit.code === 0 && checksumOk && peakRssBytes > 0 && peakRssBytes <= FLOOD_RSS_LIMIT_BYTES,
  };
}

/** e.g. `flood: 10.0 GiB in 98.1 s after a 5 s stall (104 MB/s), mvmctl peak RSS 71 MB (limit 100 MB), checksum ok, exit 0` */
export function formatFlood(r: FloodReport): string {
  const size = r.bytes >= GiB ? `${(r.bytes / GiB).toFixed(1)} GiB` : `${Math.round(r.bytes / MB)} MB`;
  const checksum = r.checksumOk ? 'checksum ok' : `checksum WRONG (${r.received} of ${r.bytes} bytes arrived)`;
  return (
    `flood: ${size} in ${r.readSeconds.toFixed(1)} s after a ${(r.stallMs / 1000).toFixed(0)} s stall ` +
    `(${Math.round(r.received / MB / r.readSeconds)} MB/s), mvmctl peak RSS ${Math.round(r.peakRssBytes / MB)} MB ` +
    `(limit ${FLOOD_RSS_LIMIT_BYTES / MB} MB), ${checksum}, ${r.exit}${r.stderrTail ? `: ${r.stderrTail}` : ''}`
  );
}
