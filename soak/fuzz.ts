// Fuzzing both ends of the agent protocol: the host's decoders and AgentSession with generated
// inputs in this process, and the agent's C parser (guest/proto.c) with libFuzzer.
import { copyFile, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setImmediate as nextTurn } from 'node:timers/promises';
import {
  encodeAgentFrame,
  encodeFrame,
  FrameDecoder,
  HEADER_SIZE,
  HostFrameDecoder,
  MAX_PAYLOAD,
  ProtocolError,
  type AgentMessage,
  type HostMessage,
  type MessageDecoder,
} from '../src/protocol/index.js';
import { lastLine, runTool } from '../src/run-tool.js';
import { chunked, decoderInput, loadFramePools, type FramePool } from './fuzz-inputs.js';
import { FuzzFailure, fuzzSessionOnce } from './fuzz-session.js';
import { repoRoot } from './paths.js';
import { seededRandom, type Random } from './random.js';

const MB = 1_000_000;
/** heapUsed and arrayBuffers must stay below this: the decoders hold at most one frame each. */
export const FUZZ_MEMORY_LIMIT_BYTES = 200 * MB;
const MEMORY_SAMPLE_EVERY = 1000;
const CRASHES_KEPT = 5;

export interface HostFuzzReport {
  inputs: { frameDecoder: number; hostFrameDecoder: number; session: number };
  crashes: number;
  /** The first few crashes, with the input number to replay from the seed. */
  crashMessages: string[];
  heapPeakBytes: number;
  arrayBuffersPeakBytes: number;
  seconds: number;
  ok: boolean;
}

/**
 * Feeds one perturbed stream to a fresh decoder in random chunks. Only ProtocolError may escape,
 * the decoder may never hold more than one frame, and a stream of valid frames must decode to
 * messages that encode back to exactly its bytes.
 */
function fuzzDecoderOnce<M>(rand: Random, decoder: MessageDecoder<M>, pool: FramePool, encode: (msg: M) => Buffer): void {
  const { bytes, pristine } = decoderInput(rand, pool);
  const decoded: M[] = [];
  for (const chunk of chunked(rand, bytes)) {
    try {
      decoded.push(...decoder.push(chunk));
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw new FuzzFailure(`decoder threw ${String(err)}`);
      if (pristine) throw new FuzzFailure(`decoder rejected valid frames (${err.message}): ${bytes.subarray(0, 64).toString('hex')}`);
      return;
    }
    if (decoder.bufferedBytes > HEADER_SIZE + MAX_PAYLOAD) throw new FuzzFailure(`decoder holds ${decoder.bufferedBytes} bytes`);
  }
  if (pristine && (decoder.bufferedBytes !== 0 || !Buffer.concat(decoded.map(encode)).equals(bytes))) {
    throw new FuzzFailure(`valid frames did not decode to themselves: ${bytes.subarray(0, 64).toString('hex')}`);
  }
}

/** `inputs` generated inputs, in turn for FrameDecoder, HostFrameDecoder and AgentSession. */
export async function fuzzHost(options: { inputs: number; seed: number }): Promise<HostFuzzReport> {
  const started = performance.now();
  const rand = seededRandom(options.seed);
  const pools = loadFramePools();
  const report: HostFuzzReport = {
    inputs: { frameDecoder: 0, hostFrameDecoder: 0, session: 0 },
    crashes: 0,
    crashMessages: [],
    heapPeakBytes: 0,
    arrayBuffersPeakBytes: 0,
    seconds: 0,
    ok: false,
  };
  const crashed = (input: number, err: unknown) => {
    report.crashes++;
    if (report.crashMessages.length < CRASHES_KEPT) report.crashMessages.push(`input ${input}: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
  };
  // A session error thrown from a stream callback surfaces here rather than in the awaited input.
  let current = 0;
  const onUncaught = (err: unknown) => crashed(current, err);
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  try {
    for (current = 0; current < options.inputs; current++) {
      try {
        switch (current % 3) {
          case 0:
            report.inputs.frameDecoder++;
            fuzzDecoderOnce(rand, new FrameDecoder(), pools.g2h, (m: AgentMessage) => encodeAgentFrame(m));
            break;
          case 1:
            report.inputs.hostFrameDecoder++;
            fuzzDecoderOnce(rand, new HostFrameDecoder(), pools.h2g, (m: HostMessage) => encodeFrame(m));
            break;
          default:
            report.inputs.session++;
            await fuzzSessionOnce(rand, pools.g2h);
        }
      } catch (err) {
        crashed(current, err);
      }
      if (current % MEMORY_SAMPLE_EVERY === 0) {
        const usage = process.memoryUsage();
        report.heapPeakBytes = Math.max(report.heapPeakBytes, usage.heapUsed);
        report.arrayBuffersPeakBytes = Math.max(report.arrayBuffersPeakBytes, usage.arrayBuffers);
      }
    }
    // Late callbacks of the last sessions still count.
    await nextTurn();
  } finally {
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
  }
  report.seconds = (performance.now() - started) / 1000;
  report.ok = report.crashes === 0 && Math.max(report.heapPeakBytes, report.arrayBuffersPeakBytes) <= FUZZ_MEMORY_LIMIT_BYTES;
  return report;
}

export function formatHostFuzz(r: HostFuzzReport): string {
  const total = r.inputs.frameDecoder + r.inputs.hostFrameDecoder + r.inputs.session;
  return (
    `fuzz host: ${total} inputs (${r.inputs.frameDecoder} FrameDecoder, ${r.inputs.hostFrameDecoder} HostFrameDecoder, ` +
    `${r.inputs.session} AgentSession) in ${r.seconds.toFixed(1)} s, ${r.crashes} crashes, ` +
    `heap peak ${Math.round(r.heapPeakBytes / MB)} MB, arrayBuffers peak ${Math.round(r.arrayBuffersPeakBytes / MB)} MB ` +
    `(limit ${FUZZ_MEMORY_LIMIT_BYTES / MB} MB)`
  );
}

export interface AgentFuzzReport {
  /** Why libFuzzer did not run (no clang, or clang cannot build a fuzzer here). */
  skipped?: string;
  seconds: number;
  execs: number;
  /** Inputs libFuzzer saved as crashing (it stops at the first). */
  crashes: number;
  edges: number;
  /** Why the harness did not build although clang can build fuzzers: a failure, not a skip. */
  buildFailure?: string;
  /** The sanitizer's or libFuzzer's report of a crash. */
  crashReport?: string;
  ok: boolean;
}

const guestDir = join(repoRoot, 'guest');

/** Builds guest/tests/fuzz_proto_libfuzzer.c with clang and runs it on the h2g vectors for `seconds`. */
export async function fuzzAgent(seconds: number): Promise<AgentFuzzReport> {
  const skipped = (why: string): AgentFuzzReport => ({ skipped: why, seconds: 0, execs: 0, crashes: 0, edges: 0, ok: true });
  try {
    await runTool('clang', ['--version'], { timeoutMs: 30_000 });
  } catch {
    return skipped('clang not found (apt-get install -y clang)');
  }
  const work = await mkdtemp(join(tmpdir(), 'mvm-soak-libfuzzer-'));
  try {
    // An empty fuzzer tells a clang without libFuzzer's runtime (a skip) from a harness that does not build (a failure).
    await writeFile(join(work, 'probe.c'), 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n');
    const probe = await runTool('clang', ['-fsanitize=fuzzer,address', '-o', join(work, 'probe'), join(work, 'probe.c')], { timeoutMs: 2 * 60_000 });
    if (probe.code !== 0) return skipped(`clang cannot link -fsanitize=fuzzer,address here: ${lastLine(probe.stderr)}`);
    const build = await runTool('make', ['-s', '-C', guestDir, 'fuzz-libfuzzer', `B=${work}`], { timeoutMs: 5 * 60_000 });
    if (build.code !== 0) {
      const why = `building guest/tests/fuzz_proto_libfuzzer.c failed: ${lastLine(build.stderr)}`;
      return { buildFailure: why, seconds: 0, execs: 0, crashes: 0, edges: 0, ok: false };
    }
    const corpus = join(work, 'corpus');
    await mkdir(corpus);
    for (const [i, frame] of loadFramePools().h2g.all.entries()) await writeFile(join(corpus, `seed-${i}`), frame);
    const started = performance.now();
    const run = await runTool(
      join(work, 'fuzz_proto_libfuzzer'),
      [`-max_total_time=${seconds}`, '-print_final_stats=1', '-rss_limit_mb=2048', `-artifact_prefix=${work}/`, corpus],
      { timeoutMs: (seconds + 120) * 1000 },
    );
    const output = run.stderr + run.stdout;
    const artifacts = (await readdir(work)).filter((name) => /^(crash|leak|timeout|oom)-/.test(name));
    const edges = [...output.matchAll(/\bcov: (\d+)/g)].map((m) => Number(m[1]));
    const crashed = run.code !== 0 || artifacts.length > 0;
    return {
      seconds: (performance.now() - started) / 1000,
      execs: Number(/stat::number_of_executed_units:\s*(\d+)/.exec(output)?.[1] ?? 0),
      crashes: crashed ? Math.max(artifacts.length, 1) : 0,
      edges: Math.max(0, ...edges),
      ...(crashed ? { crashReport: await crashReport(output, work, artifacts) } : {}),
      ok: !crashed,
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** The sanitizer's lines, and the crashing inputs moved out of the work dir so they can be replayed. */
async function crashReport(output: string, work: string, artifacts: string[]): Promise<string> {
  const lines = output.split('\n').filter((l) => /ERROR|SUMMARY|deadly|runtime error/.test(l)).slice(0, 8);
  if (artifacts.length === 0) return lines.join('\n');
  const kept = await mkdtemp(join(tmpdir(), 'mvm-soak-libfuzzer-crash-'));
  for (const name of artifacts) await copyFile(join(work, name), join(kept, name));
  return [...lines, `replay: make -C guest fuzz-libfuzzer && guest/build/fuzz_proto_libfuzzer ${kept}/${artifacts[0]}`].join('\n');
}

export function formatAgentFuzz(r: AgentFuzzReport): string {
  if (r.skipped) return `fuzz agent (libFuzzer): skipped: ${r.skipped}`;
  if (r.buildFailure) return `fuzz agent (libFuzzer): ${r.buildFailure}`;
  const execs = r.execs >= 1e6 ? `${(r.execs / 1e6).toFixed(1)}M` : String(r.execs);
  return `fuzz agent (libFuzzer): ${Math.round(r.seconds)} s, ${execs} execs, ${r.crashes} crashes, coverage ${r.edges} edges`;
}
