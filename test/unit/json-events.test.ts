/**
 * `exec --json` / `console --json` events (src/cli/json-events.ts, command-output.ts): UTF-8 split
 * across chunks, bytes that are not UTF-8, their order, the error event; each checked against
 * docs/json-events.schema.json.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { PassThrough, Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, test } from 'node:test';
import { Command } from 'commander';
import { commandOutput, jsonRequested, type CommandOutput } from '../../src/cli/command-output.js';
import { execCommand } from '../../src/cli/exec.js';
import { incompleteUtf8Tail, type JsonEvent } from '../../src/cli/json-events.js';
import { Interrupted } from '../../src/cli/signals.js';
import { consoleCommand } from '../../src/cli/up.js';
import { MvmError } from '../../src/errors.js';
import type { ExecResult } from '../../src/sdk/exec.js';

type Schema = Record<string, unknown>;
const schema = JSON.parse(readFileSync(new URL('../../../docs/json-events.schema.json', import.meta.url), 'utf8')) as Schema;

/** The problems of `value` against `node`, for the parts of JSON Schema the events' schema uses. */
function problems(value: unknown, node: Schema, path = '$'): string[] {
  if (typeof node.$ref === 'string') return problems(value, (schema.$defs as Record<string, Schema>)[node.$ref.replace('#/$defs/', '')]!, path);
  if (Array.isArray(node.oneOf)) {
    const matching = (node.oneOf as Schema[]).filter((branch) => problems(value, branch, path).length === 0).length;
    return matching === 1 ? [] : [`${path}: matches ${matching} of oneOf`];
  }
  const found: string[] = [];
  const type = node.type as string | undefined;
  const actual = Array.isArray(value) ? 'array' : Number.isInteger(value) ? 'integer' : typeof value;
  if (type && actual !== type) return [`${path}: ${actual}, not ${type}`];
  if ('const' in node && value !== node.const) found.push(`${path}: not ${String(node.const)}`);
  if (Array.isArray(node.enum) && !node.enum.includes(value)) found.push(`${path}: not one of ${node.enum.join(', ')}`);
  if (typeof node.minimum === 'number' && (value as number) < node.minimum) found.push(`${path}: below ${node.minimum}`);
  if (typeof node.maximum === 'number' && (value as number) > node.maximum) found.push(`${path}: above ${node.maximum}`);
  if (typeof node.pattern === 'string' && !new RegExp(node.pattern).test(value as string)) found.push(`${path}: does not match ${node.pattern}`);
  if (type === 'array' && node.items) (value as unknown[]).forEach((item, index) => found.push(...problems(item, node.items as Schema, `${path}[${index}]`)));
  if (type === 'object') {
    const object = value as Record<string, unknown>;
    const properties = (node.properties ?? {}) as Record<string, Schema>;
    for (const key of (node.required ?? []) as string[]) if (!(key in object)) found.push(`${path}.${key}: missing`);
    for (const [key, item] of Object.entries(object)) {
      if (properties[key]) found.push(...problems(item, properties[key], `${path}.${key}`));
      else if (node.additionalProperties === false) found.push(`${path}.${key}: not in the schema`);
    }
  }
  return found;
}

/** Collects what is written to it, line by line; each write is taken after `delayMs` (a slow reader). */
class Lines extends Writable {
  text = '';
  constructor(private readonly delayMs = 0) {
    super();
  }
  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: () => void): void {
    setTimeout(() => {
      this.text += chunk.toString();
      callback();
    }, this.delayMs);
  }
  /** All the events once everything handed to it is written, as when the process exits. */
  async events(): Promise<JsonEvent[]> {
    this.end();
    await finished(this);
    const events = this.text.split('\n').filter(Boolean).map((line) => JSON.parse(line) as JsonEvent);
    for (const event of events) assert.deepEqual(problems(event, schema), [], JSON.stringify(event));
    return events;
  }
}

interface Feed {
  stdout: PassThrough;
  stderr: PassThrough;
  output: CommandOutput;
}

/** Runs `feed` as a command whose stdout and stderr it writes (and ends), with --json events on a Lines. */
async function jsonRun(feed: (run: Feed) => Promise<ExecResult>, delayMs = 0): Promise<{ exitCode: number; events: JsonEvent[] }> {
  const out = new Lines(delayMs);
  const output = commandOutput(true, out);
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  output.attach(stdout, stderr);
  const exitCode = await output.report(() => feed({ stdout, stderr, output }));
  return { exitCode, events: await out.events() };
}

/** A command that writes `chunks` to stdout and exits 0. */
const writes = (...chunks: Buffer[]) => async ({ stdout, stderr }: Feed) => {
  for (const chunk of chunks) stdout.write(chunk);
  stdout.end();
  stderr.end();
  return { exitCode: 0, timedOut: false };
};

const bytes = (...values: number[]) => Buffer.from(values);
const latin1 = (text: string) => Buffer.from(text, 'latin1');
/** What a stream's events carry, as bytes. */
const streamBytes = (events: JsonEvent[], type: 'stdout' | 'stderr') =>
  Buffer.concat(events.flatMap((event) => (event.type === type ? [Buffer.from(event.data, event.encoding ?? 'utf8')] : [])));
const outputOf = (events: JsonEvent[]) => events.filter((event) => event.type === 'stdout' || event.type === 'stderr');

describe('--json output events', () => {
  test('a character split across chunks (2, 3 and 4 bytes) comes whole in one text event, nothing before it', async () => {
    const [e, euro, face] = [Buffer.from('é'), Buffer.from('€'), Buffer.from('😀')];
    const { events } = await jsonRun(
      writes(e.subarray(0, 1), Buffer.concat([e.subarray(1), euro.subarray(0, 2)]), euro.subarray(2), face.subarray(0, 1), face.subarray(1, 3), face.subarray(3)),
    );
    assert.deepEqual(outputOf(events), [
      { type: 'stdout', data: 'é' },
      { type: 'stdout', data: '€' },
      { type: 'stdout', data: '😀' },
    ]);
  });

  test('bytes that are not UTF-8 come in base64, the whole chunk; so does a character cut off at the end; the bytes add up', async () => {
    const chunks = [bytes(0xff), latin1('ok \xc0\xaf ok'), bytes(0xe2), Buffer.from('ab'), bytes(0xf0, 0x9f)];
    const { events } = await jsonRun(writes(...chunks));
    assert.deepEqual(outputOf(events), [
      { type: 'stdout', data: '/w==', encoding: 'base64' },
      { type: 'stdout', data: latin1('ok \xc0\xaf ok').toString('base64'), encoding: 'base64' },
      // The lead byte was held back for a continuation that did not come.
      { type: 'stdout', data: latin1('\xe2ab').toString('base64'), encoding: 'base64' },
      { type: 'stdout', data: '8J8=', encoding: 'base64' },
    ]);
    assert.deepEqual(streamBytes(events, 'stdout'), Buffer.concat(chunks));
  });

  test('incomplete tails: only a lead byte short of its continuations counts', () => {
    const cases: [number[], number][] = [
      [[], 0],
      [[0x61], 0],
      [[0xc3], 1],
      [[0xc3, 0xa9], 0],
      [[0xe2, 0x82], 2],
      [[0xf0, 0x9f, 0x98], 3],
      [[0xf0, 0x9f, 0x98, 0x80], 0],
      [[0x80, 0x80, 0x80], 0],
      [[0xff], 0],
      [[0xc0], 0],
      [[0xf5, 0x80], 0],
    ];
    for (const [input, tail] of cases) assert.equal(incompleteUtf8Tail(bytes(...input)), tail, JSON.stringify(input));
  });

  test('order: started first, the streams interleaved as they came, exit last, with a slow reader', async () => {
    const { exitCode, events } = await jsonRun(async ({ stdout, stderr, output }) => {
      output.started('vm1', { vmReadyMs: 1.4, commandStartedMs: 2.6 }, 10);
      stdout.write('one\n');
      await sleep(30);
      stderr.write('two\n');
      await sleep(30);
      stdout.write('three\n');
      stdout.end();
      stderr.end();
      return { exitCode: 137, signal: 'SIGKILL', timedOut: false };
    }, 5);
    assert.equal(exitCode, 137);
    const exit = events.pop() as Extract<JsonEvent, { type: 'exit' }>;
    assert.deepEqual(events, [
      { type: 'started', name: 'vm1', timings: { vmReadyMs: 11, commandStartedMs: 13 } },
      { type: 'stdout', data: 'one\n' },
      { type: 'stderr', data: 'two\n' },
      { type: 'stdout', data: 'three\n' },
    ]);
    assert.deepEqual({ ...exit, durationMs: {} }, { type: 'exit', exitCode: 137, signal: 'SIGKILL', timedOut: false, durationMs: {} });
    assert.ok(exit.durationMs.total > 0 && exit.durationMs.total <= Math.round(performance.now()), 'milliseconds since the process started');
  });

  test("mvmctl's failure is the last event, after the output that came, with its exit code and details", async () => {
    const { exitCode, events } = await jsonRun(async ({ stdout, stderr }) => {
      stdout.end('partial');
      stderr.end();
      throw new MvmError('the VM stopped before the command finished (guest crash?)', 125, ['[console] Kernel panic']);
    }, 5);
    assert.equal(exitCode, 125);
    assert.deepEqual(events, [
      { type: 'stdout', data: 'partial' },
      { type: 'error', message: 'the VM stopped before the command finished (guest crash?)', exitCode: 125, details: ['[console] Kernel panic'] },
    ]);
  });

  test('a failure before any output is the only event; signals and internal errors keep their exit codes', async () => {
    const cases: [unknown, Extract<JsonEvent, { type: 'error' }>][] = [
      [new MvmError("no VM named 'x' is up (none is running)", 1), { type: 'error', message: "no VM named 'x' is up (none is running)", exitCode: 1, details: [] }],
      [new Interrupted('SIGINT'), { type: 'error', message: 'interrupted by SIGINT', exitCode: 130, details: [] }],
      [new Error('boom'), { type: 'error', message: 'internal error: boom (set MVM_DEBUG=1 for details)', exitCode: 125, details: [] }],
    ];
    for (const [error, expected] of cases) {
      const out = new Lines();
      const exitCode = await commandOutput(true, out).report(() => Promise.reject(error));
      assert.equal(exitCode, expected.exitCode);
      assert.deepEqual(await out.events(), [expected]);
    }
  });

  test('abandon writes the error event at once and gives its exit code', async () => {
    const out = new Lines();
    assert.equal(commandOutput(true, out).abandon(new Interrupted('SIGTERM')), 143);
    assert.deepEqual(await out.events(), [{ type: 'error', message: 'interrupted by SIGTERM', exitCode: 143, details: [] }]);
  });
});

test('the schema check is not vacuous: it refuses events with a missing, mistyped or unknown field', () => {
  assert.deepEqual(problems({ type: 'stdout', data: 'x' }, schema), []);
  for (const bad of [{ type: 'exit', exitCode: 3, timedOut: false }, { type: 'stdout', data: 1 }, { type: 'stderr', data: 'x', extra: 1 }, { type: 'exit', exitCode: 0, signal: 'KILL', timedOut: false, durationMs: { total: 1 } }, { type: 'nope' }]) {
    assert.notDeepEqual(problems(bad, schema), [], JSON.stringify(bad));
  }
});

test('--json is read off exec and console command lines as commander reads them', () => {
  const root = new Command('mvmctl').enablePositionalOptions().addCommand(execCommand()).addCommand(consoleCommand());
  const asks = (...args: string[]) => jsonRequested(root, args);
  assert.equal(asks('exec', '--timeout', 'abc', '--json', '--', 'true'), true);
  assert.equal(asks('exec', '--json'), true);
  assert.equal(asks('exec', '-e', 'A=1', '--memory', '-1', '--json', '--', 'true'), true);
  assert.equal(asks('console', 'vm', '--json', '--command', 'true'), true);
  assert.equal(asks('console', 'vm', '--command', '--json'), false, 'a value, not the flag');
  assert.equal(asks('exec', '-w', '--json', '--', 'true'), false, 'a value, not the flag');
  assert.equal(asks('exec', '--timeout', 'abc', 'sh', '-c', 'echo --json'), false, "exec's options end at CMD");
  assert.equal(asks('exec', '--', 'sh', '--json'), false);
  assert.equal(asks('exec', '--timeout', 'abc', '--', 'true'), false);
  assert.equal(asks('ls', '--json'), false);
  assert.equal(asks(), false);
});
