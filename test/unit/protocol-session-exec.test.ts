import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { Duplex } from 'node:stream';
import { afterEach, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  AgentSession,
  Capability,
  encodeAgentFrame,
  ExecFlag,
  ExecUnavailableError,
  exitStatusToCode,
  GID_OF_USER,
  HostFrameDecoder,
  InvalidRequestError,
  MAX_DATA,
  ProtocolError,
  STDIN_WINDOW,
  type AgentMessage,
  type HostMessage,
} from '../../src/protocol/index.js';
import { afterThisTest, closeSessions, collect, FakeAgent, setup, socketPair } from './fake-agent.js';

afterEach(closeSessions);

describe('AgentSession exec', () => {
  it('sends the user with the USER flag to an agent that has the capability, and refuses it to one that has not', async () => {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    const connecting = AgentSession.connect(host, { helloTimeoutMs: 5000 });
    await agent.expect('hello');
    agent.send({ type: 'hello', version: 1, capabilities: Capability.EXEC | Capability.USER, agentVersion: 'fake 2.0' });
    const session = await connecting;
    afterThisTest(() => session.close());
    const running = session.exec({ argv: ['id'], user: { uid: 1000, gid: GID_OF_USER } });
    const exec = await agent.expect('exec');
    assert.equal(exec.flags, ExecFlag.USER);
    assert.deepEqual(exec.user, { uid: 1000, gid: GID_OF_USER });
    agent.send({ type: 'started', pid: 5 }, { type: 'exit', kind: 0, code: 0, message: '' });
    await (await running).exit;

    const old = await setup();
    await assert.rejects(old.session.exec({ argv: ['id'], user: { uid: 1000, gid: 1000 } }), (error: Error) => {
      assert.ok(error instanceof InvalidRequestError);
      assert.match(error.message, /fake 1\.0\) cannot run a command as another user; rebuild the image or template/);
      return true;
    });
  });

  it('sends EXEC as asked and streams output until EXIT', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['sh', '-c', 'x'], env: { A: '1', B: '' }, cwd: '/w', timeoutMs: 1500.2, mkdirCwd: true });
    const exec = await agent.expect('exec');
    assert.deepEqual(
      { ...exec, cwd: String(exec.cwd), argv: exec.argv.map(String), env: exec.env.map(String) },
      { type: 'exec', timeoutMs: 1501, flags: 2, cwd: '/w', argv: ['sh', '-c', 'x'], env: ['A=1', 'B='] },
    );
    agent.send(
      { type: 'started', pid: 77 },
      { type: 'stdout', data: Buffer.from('out1 ') },
      { type: 'stderr', data: Buffer.from('err') },
      { type: 'stdout', data: Buffer.from('out2') },
      { type: 'exit', kind: 1, code: 9, message: '' },
    );
    const h = await running;
    assert.equal(h.pid, 77);
    assert.equal(h.stdin, null);
    const [out, err, status] = await Promise.all([collect(h.stdout), collect(h.stderr), h.exit]);
    assert.equal(out.toString(), 'out1 out2');
    assert.equal(err.toString(), 'err');
    assert.deepEqual(status, { kind: 'signaled', code: 9, message: '' });
    assert.equal(exitStatusToCode(status), 137);
  });

  it('resolves with a settled exit when the command cannot start', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['nope'] });
    await agent.expect('exec');
    agent.send({ type: 'exit', kind: 3, code: 127, message: 'exec "nope": No such file or directory' });
    const h = await running;
    assert.equal(h.pid, null);
    const status = await h.exit;
    assert.deepEqual(status, { kind: 'spawnFailed', code: 127, message: 'exec "nope": No such file or directory' });
    assert.equal(exitStatusToCode(status), 127);
    assert.equal((await collect(h.stdout)).length, 0);
  });

  it('maps the exit kinds to shell statuses', () => {
    assert.equal(exitStatusToCode({ kind: 'exited', code: 7, message: '' }), 7);
    assert.equal(exitStatusToCode({ kind: 'signaled', code: 15, message: '' }), 143);
    assert.equal(exitStatusToCode({ kind: 'timedOut', code: 9, message: '' }), 124);
    assert.equal(exitStatusToCode({ kind: 'spawnFailed', code: 126, message: 'x' }), 126);
  });

  it('rejects with the agent text when exec is unavailable, and the session goes on', async () => {
    const { session, agent } = await setup();
    const text = 'exec is not available in this image (agent built without dev shell)';
    const running = session.exec({ argv: ['true'] });
    await agent.expect('exec');
    agent.send({ type: 'error', code: 3, fatal: false, message: text });
    await assert.rejects(running, (err: Error) => err instanceof ExecUnavailableError && err.message === text);
    const syncing = session.sync();
    await agent.expect('sync');
    agent.send({ type: 'ok' });
    await syncing;
  });

  it('refuses a second exec while one runs, and invalid requests, without sending them', async () => {
    const { session, agent } = await setup();
    const first = session.exec({ argv: ['sleep', '1'] });
    await agent.expect('exec');
    await assert.rejects(session.exec({ argv: ['true'] }), InvalidRequestError);
    await assert.rejects(session.poweroff(), InvalidRequestError);
    agent.send({ type: 'started', pid: 5 });
    const h = await first;
    assert.throws(() => h.signal(0), InvalidRequestError);
    assert.throws(() => h.signal(65), InvalidRequestError);
    h.signal(15);
    assert.deepEqual(await agent.next(), { type: 'signal', signo: 15 });
    agent.send({ type: 'exit', kind: 1, code: 15, message: '' });
    await h.exit;
    h.signal(15); // after exit: nothing sent
    await assert.rejects(session.exec({ argv: [] }), InvalidRequestError);
    await assert.rejects(session.exec({ argv: ['a\0b'] }), InvalidRequestError);
    await assert.rejects(session.exec({ argv: ['x'], env: { 'A=B': '1' } }), InvalidRequestError);
    const next = session.exec({ argv: ['true'] });
    await agent.expect('exec'); // the refused requests were never sent
    agent.send({ type: 'exit', kind: 3, code: 126, message: 'bad cwd' });
    await next;
  });

  it('stops reading the transport while stdout is not read (backpressure end to end)', async () => {
    const { session, agent, host } = await setup();
    const running = session.exec({ argv: ['yes'] });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 9 });
    const h = await running;

    const total = 24 * 1024 * 1024;
    let sent = 0;
    const hash = createHash('sha256');
    let producerDone = false;
    const produce = async (): Promise<void> => {
      let i = 0;
      while (sent < total) {
        const frame = Buffer.alloc(MAX_DATA, i++ & 0xff);
        hash.update(frame);
        sent += frame.length;
        if (!agent.send({ type: 'stdout', data: frame })) await once(agent.socket, 'drain');
      }
      agent.send({ type: 'exit', kind: 0, code: 0, message: '' });
      producerDone = true;
    };
    const producing = produce();
    await sleep(500);
    // Nobody reads stdout: the host socket is paused and the agent is stuck well short of the total.
    assert.ok(host.isPaused(), 'host transport should be paused');
    const stuckAt = sent;
    await sleep(300);
    assert.equal(sent, stuckAt, 'agent kept sending while the host was not reading');
    assert.ok(sent < 8 * 1024 * 1024, `agent sent ${sent} bytes into an unread stream`);
    assert.ok(!producerDone);
    let exited = false;
    void h.exit.then(() => (exited = true));
    await sleep(10);
    assert.ok(!exited);

    const out = createHash('sha256');
    let received = 0;
    for await (const chunk of h.stdout) {
      out.update(chunk as Buffer);
      received += (chunk as Buffer).length;
    }
    await producing;
    assert.equal(received, total);
    assert.equal(out.digest('hex'), hash.digest('hex'));
    assert.equal((await h.exit).code, 0);
  });

  it('keeps an unread stdout from blocking the next command once EXIT has arrived', async () => {
    // A bare Duplex delivers each pushed chunk whole, so EXIT is decoded while stdout is stalled.
    const fromHost = new HostFrameDecoder();
    const sent: HostMessage[] = [];
    const stream = new Duplex({
      read() {},
      write(chunk: Buffer, _encoding, callback) {
        sent.push(...fromHost.push(chunk));
        callback();
      },
    });
    const connecting = AgentSession.connect(stream);
    stream.push(encodeAgentFrame({ type: 'hello', version: 1, capabilities: 1, agentVersion: 'duplex' }));
    const session = await connecting;
    afterThisTest(() => session.close());
    const first = session.exec({ argv: ['a'] });
    const big = Buffer.alloc(MAX_DATA, 1);
    const frames: AgentMessage[] = [{ type: 'started', pid: 1 }];
    for (let i = 0; i < 8; i++) frames.push({ type: 'stdout', data: big });
    frames.push({ type: 'exit', kind: 0, code: 0, message: '' });
    stream.push(Buffer.concat(frames.map(encodeAgentFrame)));
    const h = await first;
    await h.exit; // stdout is never read
    assert.ok(!stream.isPaused());
    const second = session.exec({ argv: ['b'] });
    stream.push(encodeAgentFrame({ type: 'exit', kind: 3, code: 127, message: 'x' }));
    assert.equal((await (await second).exit).code, 127);
    assert.deepEqual(
      sent.filter((m) => m.type === 'exec').map((m) => m.type === 'exec' && String(m.argv[0])),
      ['a', 'b'],
    );
    assert.equal(h.stdout.readableLength, 8 * MAX_DATA);
  });

  it('drops output for a consumer that destroyed its stream rather than stalling', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['a'] });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 1 });
    const h = await running;
    h.stdout.destroy();
    const big = Buffer.alloc(MAX_DATA, 1);
    for (let i = 0; i < 64; i++) if (!agent.send({ type: 'stdout', data: big })) await once(agent.socket, 'drain');
    agent.send({ type: 'exit', kind: 0, code: 3, message: '' });
    assert.equal((await h.exit).code, 3);
  });

  it('keeps at most STDIN_WINDOW unacknowledged, in frames of at most 64 KiB, then STDIN_EOF', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['cat'], stdin: true });
    const exec = await agent.expect('exec');
    assert.equal(exec.flags, 1);
    agent.send({ type: 'started', pid: 3 });
    const h = await running;
    assert.ok(h.stdin);
    const input = Buffer.alloc(1024 * 1024 + 12345);
    for (let i = 0; i < input.length; i++) input[i] = (i * 31) & 0xff;
    let written = false;
    h.stdin.end(input, () => (written = true));

    const received: Buffer[] = [];
    let unacked = 0;
    let eof = false;
    let checkedFull = false;
    while (!eof) {
      const m = await agent.next();
      if (m.type === 'stdinEof') {
        eof = true;
        break;
      }
      assert.equal(m.type, 'stdin');
      if (m.type !== 'stdin') break;
      assert.ok(m.data.byteLength <= MAX_DATA);
      received.push(Buffer.from(m.data));
      unacked += m.data.byteLength;
      assert.ok(unacked <= STDIN_WINDOW, `${unacked} bytes unacknowledged`);
      if (unacked === STDIN_WINDOW) {
        if (!checkedFull) {
          // A full window: nothing more may come until we acknowledge.
          checkedFull = true;
          const before = agent.stdinBytes;
          await sleep(200);
          assert.equal(agent.stdinBytes, before);
          assert.ok(!written);
        }
        agent.send({ type: 'stdinAck', bytes: 100_000 });
        unacked -= 100_000;
      }
    }
    assert.ok(checkedFull);
    assert.ok(Buffer.concat(received).equals(input));
    agent.send({ type: 'stdinAck', bytes: unacked }, { type: 'exit', kind: 0, code: 0, message: '' });
    await h.exit;
  });

  it('drops stdin written after the command ended, without an error', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['true'], stdin: true });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 3 }, { type: 'exit', kind: 0, code: 0, message: '' });
    const h = await running;
    await h.exit;
    await new Promise<void>((resolve, reject) => h.stdin!.write('late', (err) => (err ? reject(err) : resolve())));
    await new Promise<void>((resolve) => h.stdin!.end(resolve));
    await sleep(50);
    assert.equal(agent.stdinBytes, 0);
  });

  it('treats an over-acknowledgement as a protocol error', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['cat'], stdin: true });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 3 });
    const h = await running;
    h.stdin!.write('abc');
    await agent.expect('stdin');
    agent.send({ type: 'stdinAck', bytes: 4 });
    await assert.rejects(h.exit, ProtocolError);
  });
});
