// End to end: `exec --json` and `console --json` with real VMs. Every line of stdout is an event;
// the sequence is started, output, exit (or one error event), and mvmctl exits as without --json.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { JsonEvent } from '../../src/cli/json-events.js';
import { assertNoVmLeft, isolatedEnv, mvmctl, type RunResult } from './helpers.js';

const { env, stateDir, cleanup } = isolatedEnv();
// A test that fails before its `down` would leave its VM's supervisor running after the state dir is gone.
after(async () => {
  await mvmctl(['down', '--all'], env);
  cleanup();
});

before(async () => {
  const built = await mvmctl(['image', 'build'], env);
  assert.equal(built.code, 0, built.stderr);
});

/** Every line of stdout, parsed: a line that is not JSON fails the test. */
function events(result: RunResult): JsonEvent[] {
  const text = result.stdout.toString('utf8');
  assert.ok(text.endsWith('\n'), `stdout ends with a newline: ${JSON.stringify(text)}`);
  return text
    .slice(0, -1)
    .split('\n')
    .map((line) => JSON.parse(line) as JsonEvent);
}

/** What a stream's events carry, as bytes. */
function streamBytes(all: JsonEvent[], type: 'stdout' | 'stderr'): Buffer {
  return Buffer.concat(all.flatMap((event) => (event.type === type ? [Buffer.from(event.data, event.encoding ?? 'utf8')] : [])));
}

const COMMAND = ['sh', '-c', 'echo out; echo err >&2; printf "\\377"; exit 3'];

/** The events of COMMAND: started (by `name`), its output, exit 3; mvmctl exits 3. */
function assertCommandEvents(result: RunResult, name: RegExp, kind: 'exec' | 'console'): void {
  assert.equal(result.code, 3, result.stderr);
  const all = events(result);
  const [started, exit] = [all[0]!, all.at(-1)!];
  assert.ok(started.type === 'started', JSON.stringify(all));
  assert.match(started.name, name);
  assert.deepEqual(Object.keys(started.timings), kind === 'exec' ? ['vmReadyMs', 'commandStartedMs'] : ['commandStartedMs']);
  const middle = all.slice(1, -1);
  assert.ok(middle.every((event) => event.type === 'stdout' || event.type === 'stderr'), JSON.stringify(all));
  assert.deepEqual(streamBytes(middle, 'stdout'), Buffer.from('out\n\xff', 'latin1'));
  assert.equal(streamBytes(middle, 'stderr').toString(), 'err\n');
  assert.ok(middle.some((event) => 'encoding' in event), 'the \\377 byte came in base64');
  assert.ok(exit.type === 'exit', JSON.stringify(all));
  assert.deepEqual({ ...exit, durationMs: undefined }, { type: 'exit', exitCode: 3, timedOut: false, durationMs: undefined });
  const { vmReadyMs = 0, commandStartedMs } = started.timings;
  assert.ok(vmReadyMs <= commandStartedMs && commandStartedMs <= exit.durationMs.total, JSON.stringify([started, exit]));
}

describe('--json', () => {
  test('exec --json: started, the two streams (a byte that is not UTF-8 in base64), exit 3; mvmctl exits 3', async () => {
    const result = await mvmctl(['exec', '--json', '--', ...COMMAND], env);
    assertCommandEvents(result, /^exec-/, 'exec');
    await assertNoVmLeft(stateDir);
  });

  test("mvmctl's own failure is one error event with its exit code: a bad flag value (125), a VM that is not up (1)", async () => {
    const badFlag = await mvmctl(['exec', '--timeout', 'abc', '--json', '--', 'true'], env);
    assert.equal(badFlag.code, 125, badFlag.stderr);
    assert.deepEqual(events(badFlag), [{ type: 'error', message: "option '--timeout <seconds>' argument 'abc' is invalid. 'abc' is not a whole number", exitCode: 125, details: [] }]);
    assert.equal(badFlag.stderr, '');
    const noVm = await mvmctl(['console', 'nosuch', '--json', '--', 'true'], env);
    assert.equal(noVm.code, 1, noVm.stderr);
    assert.deepEqual(events(noVm), [{ type: 'error', message: "no VM named 'nosuch' is up (none is running)", exitCode: 1, details: [] }]);
  });

  test('console --json against an up VM: the same events, named by the VM', async () => {
    const up = await mvmctl(['up', '--name', 'j1'], env);
    assert.equal(up.code, 0, up.stderr);
    try {
      assertCommandEvents(await mvmctl(['console', 'j1', '--json', '--', ...COMMAND], env), /^j1$/, 'console');
    } finally {
      const down = await mvmctl(['down', 'j1'], env);
      assert.equal(down.code, 0, down.stderr);
    }
    await assertNoVmLeft(stateDir);
  });
});
