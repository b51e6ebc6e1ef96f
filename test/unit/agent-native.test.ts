import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import {
  AgentRequestError,
  AgentSession,
  Capability,
  ErrorCode,
  ExecUnavailableError,
  exitStatusToCode,
  type ExecHandle,
  type ExecOptions,
  type ExitStatus,
} from '../../src/protocol/index.js';

// dist/test/unit/<this file> is three levels below the repository root.
const root = fileURLToPath(new URL('../../../', import.meta.url));
const AGENT = join(root, 'guest/build/mvm-agent');
const AGENT_NODEV = join(root, 'guest/build/mvm-agent-nodev');
const missing = !existsSync(AGENT) || !existsSync(AGENT_NODEV);
const skip = missing ? 'guest/build/mvm-agent* missing: run `make -C guest`' : false;

const EXEC_UNAVAILABLE = 'exec is not available in this image (agent built without dev shell)';

/** One native agent process listening on a unix socket in its own temp dir. */
class NativeAgent {
  readonly dir = mkdtempSync(join(tmpdir(), 'mvm-agent-'));
  readonly socketPath = join(this.dir, 'agent.sock');
  readonly process: ChildProcess;
  log = '';

  constructor(binary: string) {
    // A host variable must not leak into commands: the spec gives them a fixed base environment.
    this.process = spawn(binary, ['--listen', `unix:${this.socketPath}`], {
      cwd: this.dir,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', MVM_TEST_HOST_SECRET: 'leaked' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.process.stderr!.on('data', (d: Buffer) => (this.log += d.toString()));
  }

  async session(): Promise<AgentSession> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const socket: Socket = connect(this.socketPath);
      try {
        await once(socket, 'connect');
        return await AgentSession.connect(socket, { helloTimeoutMs: 10_000 });
      } catch (err) {
        socket.destroy();
        if (Date.now() > deadline) throw new Error(`cannot reach agent: ${String(err)}\n${this.log}`);
        await sleep(50);
      }
    }
  }

  async stop(): Promise<void> {
    if (this.process.exitCode === null && this.process.signalCode === null) {
      this.process.kill('SIGKILL');
      await once(this.process, 'exit');
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

interface Result {
  status: ExitStatus;
  stdout: Buffer;
  stderr: Buffer;
}

async function collect(r: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of r) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

async function finish(h: ExecHandle): Promise<Result> {
  const [stdout, stderr, status] = await Promise.all([collect(h.stdout), collect(h.stderr), h.exit]);
  return { status, stdout, stderr };
}

async function run(session: AgentSession, options: ExecOptions): Promise<Result> {
  return finish(await session.exec(options));
}

/** Pids whose command line contains `marker` (a unique sleep duration). */
function processesWith(marker: string): number[] {
  const found: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readFileSync(`/proc/${entry}/cmdline`, 'latin1').split('\0').includes(marker)) found.push(Number(entry));
    } catch {
      // the process exited while we looked
    }
  }
  return found;
}

async function waitUntilGone(marker: string, ms = 3000): Promise<number[]> {
  const deadline = Date.now() + ms;
  let left = processesWith(marker);
  while (left.length > 0 && Date.now() < deadline) {
    await sleep(50);
    left = processesWith(marker);
  }
  return left;
}

describe('native mvm-agent (dev shell)', { skip }, () => {
  let agent: NativeAgent;
  let session: AgentSession;

  before(async () => {
    agent = new NativeAgent(AGENT);
    session = await agent.session();
  });
  after(async () => {
    session?.close();
    await agent?.stop();
  });

  it('says hello with version and capabilities', () => {
    assert.match(session.agentVersion, /^mvm-agent /);
    assert.ok(session.hasCapability(Capability.EXEC));
  });

  it('passes argv through exactly: spaces, quotes, $, unicode, empty strings', async () => {
    const args = ['a b', `"double" 'single'`, '$HOME $(id) `x`', 'ünïcødé ✓ 🎉', '', '\\n\t', '-', ''];
    const r = await run(session, { argv: ['printf', '%s\\0', ...args] });
    assert.deepEqual(r.status, { kind: 'exited', code: 0, message: '' });
    assert.deepEqual(r.stdout.toString('utf8').split('\0').slice(0, -1), args);
  });

  it('gives the command the base environment overlaid with env, and nothing of its own', async () => {
    const r = await run(session, { argv: ['env'], env: { FOO: 'bar baz', HOME: '/home/x', EMPTY: '' } });
    assert.equal(r.status.code, 0);
    assert.deepEqual(r.stdout.toString().split('\n').filter(Boolean).sort(), [
      'EMPTY=',
      'FOO=bar baz',
      'HOME=/home/x',
      'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    ]);
  });

  it('runs in cwd, creates it on request, and fails to start in a missing one', async () => {
    assert.equal((await run(session, { argv: ['pwd'] })).stdout.toString(), '/\n');
    assert.equal((await run(session, { argv: ['pwd'], cwd: agent.dir })).stdout.toString(), `${agent.dir}\n`);
    const deep = join(agent.dir, 'made', 'by', 'agent');
    assert.equal((await run(session, { argv: ['pwd'], cwd: deep, mkdirCwd: true })).stdout.toString(), `${deep}\n`);
    assert.ok(statSync(deep).isDirectory());
    const r = await run(session, { argv: ['pwd'], cwd: join(agent.dir, 'nope') });
    assert.equal(r.status.kind, 'spawnFailed');
    assert.equal(exitStatusToCode(r.status), 126);
    assert.match(r.status.message, /nope/);
  });

  it('reports exit codes 0, 1, 7 and 255', async () => {
    for (const code of [0, 1, 7, 255]) {
      const r = await run(session, { argv: ['sh', '-c', `exit ${code}`] });
      assert.deepEqual(r.status, { kind: 'exited', code, message: '' });
      assert.equal(exitStatusToCode(r.status), code);
    }
  });

  it('reports death by signal as 128 + signal', async () => {
    const r = await run(session, { argv: ['sh', '-c', 'kill -9 $$'] });
    assert.deepEqual(r.status, { kind: 'signaled', code: 9, message: '' });
    assert.equal(exitStatusToCode(r.status), 137);
  });

  it('reports a missing command as 127 and a non-executable one as 126', async () => {
    const notFound = await run(session, { argv: ['mvm-no-such-command'] });
    assert.equal(notFound.status.kind, 'spawnFailed');
    assert.equal(exitStatusToCode(notFound.status), 127);
    assert.match(notFound.status.message, /mvm-no-such-command.*No such file or directory/);
    const file = join(agent.dir, 'not-executable');
    writeFileSync(file, '#!/bin/sh\necho hi\n');
    chmodSync(file, 0o644);
    const notExec = await run(session, { argv: [file] });
    assert.equal(notExec.status.kind, 'spawnFailed');
    assert.equal(exitStatusToCode(notExec.status), 126);
    assert.match(notExec.status.message, /Permission denied/);
  });

  it('keeps stdout and stderr apart', async () => {
    const r = await run(session, { argv: ['sh', '-c', 'echo out1; echo err1 >&2; echo out2; echo err2 >&2'] });
    assert.equal(r.stdout.toString(), 'out1\nout2\n');
    assert.equal(r.stderr.toString(), 'err1\nerr2\n');
  });

  it('carries 100 MB of binary output intact', async () => {
    const block = randomBytes(1_000_000);
    const file = join(agent.dir, 'block.bin');
    writeFileSync(file, block);
    const expected = createHash('sha256');
    for (let i = 0; i < 100; i++) expected.update(block);
    const h = await session.exec({ argv: ['sh', '-c', 'i=0; while [ $i -lt 100 ]; do cat "$1"; i=$((i+1)); done', 'sh', file] });
    const got = createHash('sha256');
    let bytes = 0;
    h.stdout.on('data', (c: Buffer) => {
      got.update(c);
      bytes += c.length;
    });
    const [stderr, status] = await Promise.all([collect(h.stderr), h.exit]);
    assert.equal(stderr.toString(), '');
    assert.equal(status.code, 0);
    assert.equal(bytes, 100_000_000);
    assert.equal(got.digest('hex'), expected.digest('hex'));
  });

  it('stalls the command while the host does not read its output', async () => {
    const h = await session.exec({ argv: ['sh', '-c', 'head -c 30000000 /dev/zero; echo done >&2'] });
    let exited = false;
    void h.exit.then(() => (exited = true));
    const stderr = collect(h.stderr);
    await sleep(1000);
    assert.ok(!exited, 'the command finished although nobody read its 30 MB');
    const out = await collect(h.stdout);
    assert.equal(out.length, 30_000_000);
    assert.equal((await stderr).toString(), 'done\n');
    assert.equal((await h.exit).code, 0);
  });

  it('feeds stdin through to EOF', async () => {
    const input = randomBytes(3 * 1024 * 1024 + 17);
    const h = await session.exec({ argv: ['cat'], stdin: true });
    assert.ok(h.stdin);
    h.stdin.end(input);
    const r = await finish(h);
    assert.equal(r.status.code, 0);
    assert.ok(r.stdout.equals(input));
  });

  it('gives a command without stdin /dev/null', async () => {
    const r = await run(session, { argv: ['cat'] });
    assert.deepEqual([r.status.code, r.stdout.length], [0, 0]);
  });

  it('kills the whole process group at the deadline', async () => {
    const marker = '100.123';
    const started = Date.now();
    const r = await run(session, { argv: ['sh', '-c', `sleep ${marker} & sleep ${marker}`], timeoutMs: 500 });
    const took = Date.now() - started;
    assert.deepEqual(r.status, { kind: 'timedOut', code: 9, message: '' });
    assert.equal(exitStatusToCode(r.status), 124);
    assert.ok(took >= 450 && took < 5000, `took ${took} ms`);
    assert.deepEqual(await waitUntilGone(marker), []);
  });

  it('forwards signals to the command', async () => {
    const h = await session.exec({ argv: ['sleep', '100.234'] });
    assert.ok(h.pid && h.pid > 0);
    await sleep(100);
    h.signal(15);
    const r = await finish(h);
    assert.deepEqual(r.status, { kind: 'signaled', code: 15, message: '' });
    assert.equal(exitStatusToCode(r.status), 143);
  });

  it('streams output live', async () => {
    const started = Date.now();
    const h = await session.exec({ argv: ['sh', '-c', 'echo first; sleep 2; echo second'] });
    const [first] = (await once(h.stdout, 'data')) as [Buffer];
    const firstAt = Date.now() - started;
    assert.equal(first.toString(), 'first\n');
    assert.ok(firstAt < 1500, `first line after ${firstAt} ms`);
    const rest = await finish(h);
    assert.equal(rest.stdout.toString(), 'second\n');
    assert.ok(Date.now() - started >= 2000);
  });

  it('runs several commands in sequence on one session', async () => {
    for (let i = 0; i < 10; i++) {
      const r = await run(session, { argv: ['echo', String(i)] });
      assert.equal(r.stdout.toString(), `${i}\n`);
    }
  });

  it('answers SYNC, and MOUNT of a missing device with MOUNT_FAILED', async () => {
    await session.sync();
    await assert.rejects(
      session.mount('/dev/mvm-no-such-device', join(agent.dir, 'mnt'), 'ext4', true),
      (err: Error) => err instanceof AgentRequestError && err.code === ErrorCode.MOUNT_FAILED && err.message.length > 0,
    );
  });

  it('kills a running command when the host disconnects, and serves the next session', async () => {
    const marker = '100.345';
    const h = await session.exec({ argv: ['sh', '-c', `sleep ${marker} & sleep ${marker}`] });
    await sleep(200);
    assert.equal(processesWith(marker).length, 2);
    session.close();
    await assert.rejects(h.exit);
    assert.deepEqual(await waitUntilGone(marker), []);
    session = await agent.session();
    assert.equal((await run(session, { argv: ['echo', 'again'] })).stdout.toString(), 'again\n');
  });

  it('acknowledges POWEROFF and exits when run natively', async () => {
    await session.poweroff();
    const [code] = (await once(agent.process, 'exit')) as [number];
    assert.equal(code, 0);
  });
});

describe('native mvm-agent-nodev', { skip }, () => {
  let agent: NativeAgent;
  let session: AgentSession;

  before(async () => {
    agent = new NativeAgent(AGENT_NODEV);
    session = await agent.session();
  });
  after(async () => {
    session?.close();
    await agent?.stop();
  });

  it('does not advertise EXEC and refuses it with the exact message', async () => {
    assert.ok(!session.hasCapability(Capability.EXEC));
    await assert.rejects(session.exec({ argv: ['true'] }), (err: Error) => err instanceof ExecUnavailableError && err.message === EXEC_UNAVAILABLE);
    // Refusing exec is not fatal: the session still works.
    await session.sync();
  });
});
