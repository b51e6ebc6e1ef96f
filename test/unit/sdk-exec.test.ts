/**
 * The TypeScript API (`exec()`, src/sdk/) against a scripted guest (scripted-guest.ts): its streams,
 * its result, kill(), abort, stdin, launch plans, and options refused before any VM starts.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { after, describe, test } from 'node:test';
import { MvmError } from '../../src/errors.js';
import type { BootImage } from '../../src/vm/index.js';
import { ExecFlag, ExitKind, type Bytes, type HostMessage } from '../../src/protocol/index.js';
import type { ExecStarted } from '../../src/sdk/exec.js';
import type { ExecOptions } from '../../src/sdk/options.js';
import { InvalidOptionError } from '../../src/sdk/parse.js';
import { SPEC_ARTIFACT } from './launchplan-fixtures.js';
import { politeAgent, scriptedExec, type GuestScript } from './scripted-guest.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-sdk-'));
process.env.MVM_STATE_DIR = join(scratch, 'state');
process.env.MVM_DATA_DIR = join(scratch, 'data');
after(() => rmSync(scratch, { recursive: true, force: true }));

const image: BootImage = { kernel: '/k', kernelSha256: 'k', kernelArgs: [] };
// The scripted backend emulates only TCG; with auto the host's KVM would be looked at.
const tcg: ExecOptions = { accel: 'tcg' };

const scripted = (script: GuestScript) => scriptedExec(script, image);

async function text(stream: Readable): Promise<string> {
  let all = '';
  for await (const chunk of stream) all += String(chunk);
  return all;
}

const execMessage = (sent: HostMessage[]) => sent.find((m): m is Extract<HostMessage, { type: 'exec' }> => m.type === 'exec')!;
const strings = (fields: readonly Bytes[]) => fields.map((field) => (typeof field === 'string' ? field : Buffer.from(field).toString('utf8')));

/** A guest whose command ends as `exit` says. */
const commandEnds =
  (exit: { kind: ExitKind; code: number; message?: string }): GuestScript =>
  (message, guest) => {
    if (message.type !== 'exec') return politeAgent(message, guest);
    const ended = { type: 'exit', message: '', ...exit } as const;
    // A command that could not start gets no STARTED.
    if (exit.kind === ExitKind.SPAWN_FAILED) guest.send(ended);
    else guest.send({ type: 'started', pid: 2 }, ended);
  };

describe('exec() (scripted guest)', () => {
  test('stdout and stderr are async-iterable and apart; exited has the exit code; env reaches the guest', async () => {
    const { exec, backend, sent } = scripted((message, guest) => {
      if (message.type !== 'exec') return politeAgent(message, guest);
      guest.send(
        { type: 'started', pid: 2 },
        { type: 'stdout', data: Buffer.from('hello\n') },
        { type: 'stderr', data: Buffer.from('oops\n') },
        { type: 'stdout', data: Buffer.from('world\n') },
        { type: 'exit', kind: ExitKind.EXITED, code: 7, message: '' },
      );
    });
    const handle = exec(['sh', '-c', 'x'], { ...tcg, env: { GREETING: 'hi' } });
    assert.equal(handle.stdin, undefined);
    const [out, err, result] = await Promise.all([text(handle.stdout), text(handle.stderr), handle.exited]);
    assert.equal(out, 'hello\nworld\n');
    assert.equal(err, 'oops\n');
    assert.deepEqual(result, { exitCode: 7, timedOut: false });
    const request = execMessage(sent());
    assert.deepEqual(strings(request.argv), ['sh', '-c', 'x']);
    assert.deepEqual(strings(request.env), ['GREETING=hi']);
    assert.equal(request.flags & ExecFlag.STDIN, 0);
    assert.deepEqual(backend.specs.map((spec) => [spec.cpus, spec.memoryMiB]), [[2, 512]], 'the CLI’s default size');
    assert.ok(await backend.allExited());
  });

  test('exit codes as the CLI documents them: 128+N and the signal, 124 and timedOut, 127 with its warning', async () => {
    const cases: [{ kind: ExitKind; code: number; message?: string }, object, string[]][] = [
      [{ kind: ExitKind.EXITED, code: 0 }, { exitCode: 0, timedOut: false }, []],
      [{ kind: ExitKind.SIGNALED, code: 9 }, { exitCode: 137, signal: 'SIGKILL', timedOut: false }, []],
      [{ kind: ExitKind.TIMED_OUT, code: 9 }, { exitCode: 124, timedOut: true }, ['command timed out after 5 s']],
      [{ kind: ExitKind.SPAWN_FAILED, code: 127, message: 'exec "nope": No such file or directory' }, { exitCode: 127, timedOut: false }, ['exec "nope": No such file or directory']],
    ];
    for (const [exit, expected, warnings] of cases) {
      const { exec } = scripted(commandEnds(exit));
      const lines: string[] = [];
      const handle = exec(['cmd'], { ...tcg, timeout: 5, onWarning: (line) => lines.push(line) });
      handle.stdout.resume();
      handle.stderr.resume();
      assert.deepEqual(await handle.exited, expected);
      assert.deepEqual(lines, warnings);
    }
  });

  test('onStarted: once, when the command has started, with the VM name and timings since the call; not for a command that could not start', async () => {
    const { exec } = scripted(commandEnds({ kind: ExitKind.EXITED, code: 0 }));
    const seen: ExecStarted[] = [];
    const calledAt = performance.now();
    const handle = exec(['true'], { ...tcg, onStarted: (started) => seen.push(started) });
    handle.stdout.resume();
    handle.stderr.resume();
    await handle.exited;
    const elapsed = performance.now() - calledAt;
    assert.equal(seen.length, 1);
    const [{ name, timings }] = seen as [ExecStarted];
    assert.match(name, /^exec-/);
    assert.ok(timings.vmReadyMs! >= 0 && timings.vmReadyMs! <= timings.commandStartedMs && timings.commandStartedMs <= elapsed, JSON.stringify(timings));

    const notFound = scripted(commandEnds({ kind: ExitKind.SPAWN_FAILED, code: 127, message: 'exec "nope": No such file or directory' }));
    const missing = notFound.exec(['nope'], { ...tcg, onStarted: (started) => seen.push(started) });
    missing.stdout.resume();
    missing.stderr.resume();
    assert.equal((await missing.exited).exitCode, 127);
    assert.equal(seen.length, 1);
  });

  test("kill('SIGTERM') sends SIGNAL 15 to the running command; exited gives 143", async () => {
    const { exec, sent } = scripted((message, guest) => {
      if (message.type === 'exec') return guest.send({ type: 'started', pid: 2 }, { type: 'stdout', data: Buffer.from('ready\n') });
      if (message.type === 'signal') return guest.send({ type: 'exit', kind: ExitKind.SIGNALED, code: message.signo, message: '' });
      politeAgent(message, guest);
    });
    const handle = exec(['sleep', '100'], tcg);
    handle.stderr.resume();
    for await (const chunk of handle.stdout) {
      assert.equal(String(chunk), 'ready\n');
      handle.kill('SIGTERM');
    }
    assert.deepEqual(await handle.exited, { exitCode: 143, signal: 'SIGTERM', timedOut: false });
    assert.deepEqual(sent().filter((m) => m.type === 'signal'), [{ type: 'signal', signo: 15 }]);
  });

  test('kill() before the command has started is sent as it starts (SIGKILL by default)', async () => {
    const { exec, sent } = scripted((message, guest) => {
      if (message.type === 'exec') return guest.send({ type: 'started', pid: 2 });
      if (message.type === 'signal') return guest.send({ type: 'exit', kind: ExitKind.SIGNALED, code: message.signo, message: '' });
      politeAgent(message, guest);
    });
    const handle = exec(['sleep', '100'], tcg);
    handle.kill();
    assert.deepEqual(await handle.exited, { exitCode: 137, signal: 'SIGKILL', timedOut: false });
    assert.deepEqual(sent().filter((m) => m.type === 'signal'), [{ type: 'signal', signo: 9 }]);
    assert.throws(() => handle.kill('SIGNOPE' as NodeJS.Signals), TypeError);
    assert.throws(() => handle.kill(65), TypeError);
  });

  test('a reader that stops reading (break out of for await) does not stall the command: the rest is dropped', async () => {
    const { exec } = scripted((message, guest) => {
      if (message.type !== 'exec') return politeAgent(message, guest);
      guest.send({ type: 'started', pid: 2 }, { type: 'stdout', data: Buffer.from('first\n') });
      // Far more than every buffer on the way holds.
      for (let i = 0; i < 64; i++) guest.send({ type: 'stdout', data: Buffer.alloc(64 * 1024, 'x') });
      guest.send({ type: 'exit', kind: ExitKind.EXITED, code: 0, message: '' });
    });
    const handle = exec(['yes'], { ...tcg, timeout: 5 });
    handle.stderr.resume();
    for await (const chunk of handle.stdout) {
      assert.match(String(chunk), /^first/);
      break;
    }
    assert.deepEqual(await handle.exited, { exitCode: 0, timedOut: false });
  });

  test('aborting options.signal kills the VMM, ends the streams and rejects exited with the reason', async () => {
    const controller = new AbortController();
    const reason = new Error('stop now');
    const { exec, backend } = scripted((message, guest) => {
      if (message.type !== 'exec') return politeAgent(message, guest);
      guest.send({ type: 'started', pid: 2 }, { type: 'stdout', data: Buffer.from('partial\n') });
      setTimeout(() => controller.abort(reason), 50);
    });
    const handle = exec(['sleep', '100'], { ...tcg, signal: controller.signal });
    handle.stderr.resume();
    assert.equal(await text(handle.stdout), 'partial\n');
    await assert.rejects(handle.exited, (error) => error === reason);
    assert.equal(backend.vms.length, 1);
    assert.ok(await backend.allExited(), 'the VMM was killed');
  });

  test('an already aborted signal starts nothing', async () => {
    const { exec, backend } = scripted(politeAgent);
    const handle = exec(['true'], { ...tcg, signal: AbortSignal.abort(new Error('too late')) });
    await assert.rejects(handle.exited, /too late/);
    assert.equal(backend.specs.length, 0);
  });

  test('stdin: what is written reaches the command, end() is its EOF', async () => {
    const { exec, sent } = scripted((message, guest) => {
      if (message.type === 'exec') return guest.send({ type: 'started', pid: 2 });
      if (message.type === 'stdin') return guest.send({ type: 'stdout', data: Buffer.from(message.data) }, { type: 'stdinAck', bytes: message.data.length });
      if (message.type === 'stdinEof') return guest.send({ type: 'exit', kind: ExitKind.EXITED, code: 0, message: '' });
      politeAgent(message, guest);
    });
    const handle = exec(['cat'], { ...tcg, stdin: true });
    handle.stderr.resume();
    handle.stdin!.write('abc');
    handle.stdin!.end('def\n');
    assert.equal(await text(handle.stdout), 'abcdef\n');
    assert.deepEqual(await handle.exited, { exitCode: 0, timedOut: false });
    assert.equal(execMessage(sent()).flags & ExecFlag.STDIN, ExecFlag.STDIN);
  });

  test('a launch plan gives argv, working_dir (created) and env; options.env goes on top', async () => {
    const plan = join(scratch, 'launch.json');
    writeFileSync(plan, SPEC_ARTIFACT);
    const { exec, sent } = scripted(commandEnds({ kind: ExitKind.EXITED, code: 0 }));
    const handle = exec([], { ...tcg, launchPlan: plan, env: { PORT: '9090' } });
    handle.stdout.resume();
    handle.stderr.resume();
    assert.equal((await handle.exited).exitCode, 0);
    const request = execMessage(sent());
    assert.deepEqual(strings(request.argv), ['python', 'main.py']);
    assert.equal(strings([request.cwd])[0], '/app');
    assert.equal(request.flags & ExecFlag.MKDIR_CWD, ExecFlag.MKDIR_CWD);
    assert.deepEqual(strings(request.env).sort(), ['LOG_LEVEL=info', 'PORT=9090']);
  });

  test('envFiles go between the plan and env (later files win; a bare KEY from this process); createCwd makes a cwd given here', async () => {
    const plan = join(scratch, 'launch-env.json');
    writeFileSync(plan, SPEC_ARTIFACT);
    const first = join(scratch, 'first.env');
    const second = join(scratch, 'second.env');
    writeFileSync(first, '# first\nLOG_LEVEL=from-file\nA=1\nB=1\nSDK_TEST_FROM_ENV\n');
    writeFileSync(second, 'B=2\nC=2\n');
    process.env.SDK_TEST_FROM_ENV = 'from this process';
    try {
      const { exec, sent } = scripted(commandEnds({ kind: ExitKind.EXITED, code: 0 }));
      const handle = exec([], { ...tcg, launchPlan: plan, envFiles: [first, second], env: { C: 'env' }, cwd: '/new/dir', createCwd: true });
      handle.stdout.resume();
      handle.stderr.resume();
      assert.equal((await handle.exited).exitCode, 0);
      const request = execMessage(sent());
      assert.deepEqual(strings(request.env).sort(), ['A=1', 'B=2', 'C=env', 'LOG_LEVEL=from-file', 'PORT=8080', 'SDK_TEST_FROM_ENV=from this process']);
      assert.equal(strings([request.cwd])[0], '/new/dir');
      assert.equal(request.flags & ExecFlag.MKDIR_CWD, ExecFlag.MKDIR_CWD);
    } finally {
      delete process.env.SDK_TEST_FROM_ENV;
    }
    const { exec, sent } = scripted(commandEnds({ kind: ExitKind.EXITED, code: 0 }));
    const plain = exec(['x'], { ...tcg, cwd: '/w' });
    plain.stdout.resume();
    plain.stderr.resume();
    await plain.exited;
    assert.equal(execMessage(sent()).flags & ExecFlag.MKDIR_CWD, 0, 'a cwd is not created unless asked');
  });

  test('bad options reject exited with a typed error (exit code 125) before any VM starts; exec() itself does not throw', async () => {
    const { exec, backend } = scripted(politeAgent);
    const badEnvFile = join(scratch, 'bad.env');
    writeFileSync(badEnvFile, 'OK=1\nNOT OK=2\n');
    const cases: [string[], ExecOptions, RegExp, new (...args: never[]) => MvmError][] = [
      [['x'], { memory: '2048G' }, /^memory: '2048G' is more than 1T$/, InvalidOptionError],
      [['x'], { memory: 32 }, /^memory: '32' is too small/, InvalidOptionError],
      [['x'], { memory: 'lots' }, /^memory: 'lots' is not a size/, InvalidOptionError],
      [['x'], { cpus: 0 }, /^cpus: '0' is not between 1 and 64$/, InvalidOptionError],
      [['x'], { cpus: 1.5 }, /^cpus: '1.5' is not a whole number$/, InvalidOptionError],
      [['x'], { timeout: 0 }, /^timeout: /, InvalidOptionError],
      [['x'], { env: { '1X': 'a' } }, /^env: variable name "1X" must match/, InvalidOptionError],
      [['x'], { env: { A: 'a\0b' } }, /^env\.A: contains a NUL byte/, InvalidOptionError],
      [['x'], { cwd: 'work' }, /^cwd: 'work' is not an absolute guest path$/, InvalidOptionError],
      [['x'], { accel: 'fast' as 'tcg' }, /^accel: 'fast' is not one of auto, kvm, tcg$/, InvalidOptionError],
      [['x'], { addDirs: ['nope'] }, /^--add-dir 'nope': expected HOST:GUEST/, MvmError],
      [['x'], { addDirs: [{ host: join(scratch, 'missing'), guest: '/w' }] }, /does not exist/, MvmError],
      [['x'], { addDirs: [{ host: scratch, guest: '/w', mode: 'wx' as 'rw' }] }, /^addDirs: mode must be ro or rw/, InvalidOptionError],
      [['x'], { template: 'nope' }, /^no template named 'nope'/, MvmError],
      [['x'], { template: './nope' }, /^template directory \.\/nope does not exist$/, MvmError],
      [['x'], { flake: './f', template: 'a' }, /^flake: give flake or template, not both/, InvalidOptionError],
      [['x'], { flake: '#attr' }, /^flake: '#attr' is not a flake reference/, InvalidOptionError],
      [['x'], { flake: '--impure' }, /^flake: '--impure' is not a flake reference/, InvalidOptionError],
      [['x'], { envFiles: 'a.env' as unknown as string[] }, /^envFiles: expected an array of strings$/, InvalidOptionError],
      [['x'], { envFiles: [join(scratch, 'missing.env')] }, /^env file .+missing\.env: no such file$/, MvmError],
      [['x'], { envFiles: [badEnvFile] }, /^env file .+bad\.env, line 2: variable name "NOT OK" must match/, MvmError],
      [[], { launchPlan: join(scratch, 'no-plan.json') }, /^launch plan /, MvmError],
      [[], {}, /^argv: no command given/, InvalidOptionError],
      [['x'], { launchPlan: 'plan.json' }, /^launchPlan: the launch plan supplies the command/, InvalidOptionError],
    ];
    for (const [argv, options, message, type] of cases) {
      const handle = exec(argv, { ...tcg, ...options });
      await assert.rejects(handle.exited, (error: unknown) => error instanceof type && error.exitCode === 125 && message.test(error.message), message.source);
      assert.equal(await text(handle.stdout), '', 'the streams end');
    }
    assert.equal(backend.specs.length, 0, 'no VM was started');
  });
});
