// One fuzz input for AgentSession: a real session over an in-memory transport, driven into a state
// (greeting, a running command with or without stdin, a pending request), then fed a perturbed
// version of what a well-behaved agent would send there.
import { Duplex } from 'node:stream';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { MvmError } from '../src/errors.js';
import {
  AgentSession,
  encodeAgentFrame,
  exitStatusToCode,
  PROTOCOL_VERSION,
  STDIN_WINDOW,
  type AgentMessage,
  type ExecHandle,
  type ExitStatus,
} from '../src/protocol/index.js';
import { chunked, perturbScript, type FramePool } from './fuzz-inputs.js';
import { below, pick, randomBytes, type Random } from './random.js';

/** An invariant the session broke: not a typed error, a bad exit status, lost or reordered output. */
export class FuzzFailure extends Error {
  override name = 'FuzzFailure';
}

const frame = (msg: AgentMessage): Buffer => encodeAgentFrame(msg);
const HELLO = frame({ type: 'hello', version: PROTOCOL_VERSION, capabilities: 0xf, agentVersion: 'fuzz-agent' });

type Scenario = 'connect' | 'exec' | 'execStdin' | 'request';
const SCENARIOS: readonly Scenario[] = ['connect', 'exec', 'execStdin', 'request'];

/** What a well-behaved agent sends in `scenario`, and the stdout a consumer must then see. */
function script(rand: Random, scenario: Scenario): { frames: Buffer[]; stdout: Buffer } {
  if (scenario === 'connect') return { frames: rand() < 0.2 ? [HELLO, HELLO] : [HELLO], stdout: Buffer.alloc(0) };
  if (scenario === 'request') {
    const answer: AgentMessage = rand() < 0.7 ? { type: 'ok' } : { type: 'error', code: 1 + below(rand, 7), fatal: rand() < 0.3, message: 'refused' };
    return { frames: [frame(answer)], stdout: Buffer.alloc(0) };
  }
  if (rand() < 0.1) return { frames: [frame({ type: 'exit', kind: 3, code: 127, message: 'exec "x": No such file or directory' })], stdout: Buffer.alloc(0) };
  const frames = [frame({ type: 'started', pid: 1 + below(rand, 1000) })];
  const stdout: Buffer[] = [];
  for (let n = below(rand, 12); n > 0; n--) {
    const data = randomBytes(rand, 1 + below(rand, 2000));
    const stream = rand() < 0.6 ? 'stdout' : 'stderr';
    if (stream === 'stdout') stdout.push(data);
    frames.push(frame({ type: stream, data }));
    if (scenario === 'execStdin' && rand() < 0.3) frames.push(frame({ type: 'stdinAck', bytes: 1 + below(rand, 4096) }));
  }
  const exit: AgentMessage = pick(rand, [
    { type: 'exit', kind: 0, code: below(rand, 256), message: '' },
    { type: 'exit', kind: 1, code: 1 + below(rand, 64), message: '' },
    { type: 'exit', kind: 2, code: 9, message: '' },
  ] as const);
  frames.push(frame(exit));
  return { frames, stdout: Buffer.concat(stdout) };
}

/** Everything pushed is in the transport's buffer; a few turns of the event loop let it flow through. */
async function settle(): Promise<void> {
  for (let turn = 0; turn < 3; turn++) await nextTurn();
}

/** A promise's outcome, readable without awaiting it. */
function track<T>(promise: Promise<T>): { promise: Promise<T>; state: () => 'pending' | 'resolved' | 'rejected' } {
  let state: 'pending' | 'resolved' | 'rejected' = 'pending';
  promise.then(
    () => (state = 'resolved'),
    () => (state = 'rejected'),
  );
  return { promise, state: () => state };
}

function checkStatus(status: ExitStatus): void {
  const code = exitStatusToCode(status);
  if (!Number.isInteger(code) || code < 0 || code > 255) throw new FuzzFailure(`exit status ${JSON.stringify(status)} maps to ${code}`);
}

const STDIN_DATA = Buffer.alloc(STDIN_WINDOW + 100_000, 0x73);

/** How the command's consumer behaves: reads everything, reads nothing (stalls the session), or gives up. */
function consume(rand: Random, handle: ExecHandle, mustRead: boolean): Buffer[] {
  const seen: Buffer[] = [];
  const mode = mustRead ? 0 : below(rand, 3);
  if (mode === 0) {
    handle.stdout.on('data', (chunk: Buffer) => seen.push(chunk));
    handle.stderr.resume();
  } else if (mode === 2) {
    handle.stdout.destroy();
    handle.stderr.destroy();
  }
  if (handle.stdin) {
    // More than one window, so the session has to wait for STDIN_ACKs.
    handle.stdin.write(STDIN_DATA.subarray(0, STDIN_WINDOW + 1 + below(rand, STDIN_DATA.length - STDIN_WINDOW)));
    if (rand() < 0.5) handle.stdin.end();
  }
  return seen;
}

/**
 * Runs one input; resolves when every promise of the session has settled. Throws FuzzFailure when
 * an invariant broke; any other error escaping here is a crash of the code under test.
 */
export async function fuzzSessionOnce(rand: Random, pool: FramePool): Promise<void> {
  const transport = new Duplex({ read() {}, write(_chunk, _encoding, callback) { callback(); } });
  const ended = new AbortController();
  const scenario = pick(rand, SCENARIOS);
  const expected = script(rand, scenario);
  const input = perturbScript(rand, scenario === 'execStdin' ? expected.frames.slice(1) : expected.frames, pool);
  const feed = () => {
    for (const chunk of chunked(rand, input.bytes)) transport.push(chunk);
    if (rand() < 0.2) transport.push(null);
  };
  const promises: Promise<unknown>[] = [];
  const connecting = track(AgentSession.connect(transport, { signal: ended.signal }));
  promises.push(connecting.promise);
  let exit: ReturnType<typeof track<ExitStatus>> | undefined;
  let request: ReturnType<typeof track<void>> | undefined;
  let stdout: Buffer[] = [];
  if (scenario === 'connect') {
    feed();
  } else {
    transport.push(HELLO);
    const session = await connecting.promise;
    if (scenario === 'request') {
      request = track(pick(rand, [() => session.mount('serial:fuzz', '/mnt', 'ext4'), () => session.unmount('/mnt'), () => session.sync()])());
      promises.push(request.promise);
      feed();
    } else {
      const started = track(session.exec({ argv: ['fuzz'], stdin: scenario === 'execStdin', signal: ended.signal }));
      promises.push(started.promise);
      // STDIN_ACKs only make sense once stdin has been written: that scenario starts the command
      // cleanly and perturbs what follows.
      if (scenario === 'execStdin') transport.push(expected.frames[0]);
      else feed();
      await settle();
      // A perturbed stream may never answer EXEC; the abort below ends it.
      const handle = started.state() === 'resolved' ? await started.promise : undefined;
      if (handle) {
        stdout = consume(rand, handle, input.pristine);
        exit = track(handle.exit);
        promises.push(exit.promise);
      }
      if (scenario === 'execStdin') feed();
    }
  }
  await settle();
  if (input.pristine) checkPristine(scenario, connecting.state(), exit?.state(), request?.state(), Buffer.concat(stdout), expected.stdout, input.bytes);
  ended.abort(new Error('fuzz input done'));
  for (const outcome of await Promise.allSettled(promises)) {
    if (outcome.status === 'rejected' && !(outcome.reason instanceof MvmError)) {
      throw new FuzzFailure(`untyped rejection: ${String(outcome.reason)}`);
    }
    if (outcome.status === 'fulfilled' && isExitStatus(outcome.value)) checkStatus(outcome.value);
  }
  transport.destroy();
}

function isExitStatus(value: unknown): value is ExitStatus {
  return typeof value === 'object' && value !== null && 'kind' in value && 'code' in value;
}

/** Exactly what a well-behaved agent sends must work: greeted, answered, exited, all output delivered in order. */
function checkPristine(
  scenario: Scenario,
  connected: string,
  exited: string | undefined,
  requested: string | undefined,
  stdout: Buffer,
  expectedStdout: Buffer,
  bytes: Buffer,
): void {
  const ok =
    connected === 'resolved' &&
    (scenario !== 'request' || requested !== 'pending') &&
    (!scenario.startsWith('exec') || (exited === 'resolved' && stdout.equals(expectedStdout)));
  if (!ok) {
    throw new FuzzFailure(
      `a well-formed ${scenario} exchange failed (connect ${connected}, exit ${exited}, request ${requested}, ` +
        `stdout ${stdout.length}/${expectedStdout.length} bytes): ${bytes.subarray(0, 64).toString('hex')}`,
    );
  }
}
