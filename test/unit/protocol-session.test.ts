import assert from 'node:assert/strict';
import { once } from 'node:events';
import { afterEach, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  AgentConnectionError,
  AgentRequestError,
  AgentTimeoutError,
  AgentSession,
  AgentVersionError,
  Capability,
  ProtocolError,
  SessionAbortedError,
  type AgentMessage,
} from '../../src/protocol/index.js';
import { afterThisTest, closeSessions, FakeAgent, setup, socketPair } from './fake-agent.js';

afterEach(closeSessions);

describe('AgentSession handshake', () => {
  it('sends HELLO v1 with the clock and 32 bytes of entropy, and exposes the answer', async () => {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    const connecting = AgentSession.connect(host);
    const hello = await agent.expect('hello');
    assert.equal(hello.version, 1);
    assert.equal(hello.entropy.byteLength, 32);
    assert.ok(Math.abs(Number(hello.hostTimeNs / 1_000_000n) - Date.now()) < 5000);
    agent.send({ type: 'hello', version: 1, capabilities: Capability.EXEC | Capability.TIME_ENTROPY, agentVersion: 'mvm-agent 0.2.0' });
    const session = await connecting;
    afterThisTest(() => session.close());
    assert.equal(session.agentVersion, 'mvm-agent 0.2.0');
    assert.equal(session.capabilities, 9);
    assert.ok(session.hasCapability(Capability.EXEC));
    assert.ok(!session.hasCapability(Capability.MOUNT));
  });

  it('repeats HELLO until answered and ignores the answers to repeats', async () => {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    const connecting = AgentSession.connect(host);
    await agent.expect('hello');
    await agent.expect('hello'); // the repeat, ~250 ms later
    const reply: AgentMessage = { type: 'hello', version: 1, capabilities: 1, agentVersion: 'a' };
    agent.send(reply, reply);
    const session = await connecting;
    afterThisTest(() => session.close());
    const run = session.exec({ argv: ['true'] });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 1 }, { type: 'exit', kind: 0, code: 0, message: '' });
    assert.equal((await (await run).exit).kind, 'exited');
  });

  it('refuses an agent speaking another version, naming both', async () => {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    const connecting = AgentSession.connect(host);
    await agent.handshake(2);
    await assert.rejects(connecting, (err: Error) => err instanceof AgentVersionError && /version 2\b.*version 1\b/.test(err.message));
    await agent.whenClosed();
  });

  it('reports the agent refusing our version', async () => {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    const connecting = AgentSession.connect(host);
    await agent.expect('hello');
    agent.send({ type: 'error', code: 2, fatal: true, message: 'agent speaks version 3' });
    await assert.rejects(connecting, (err: Error) => err instanceof AgentVersionError && /version 1: agent speaks version 3/.test(err.message));
  });

  it('times out a silent agent and closes the stream', async () => {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    await assert.rejects(AgentSession.connect(host, { helloTimeoutMs: 300 }), (err: Error) => err instanceof AgentConnectionError && /300 ms/.test(err.message));
    await agent.whenClosed();
  });

  it('aborts the handshake through its signal', async () => {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    const ac = new AbortController();
    const connecting = AgentSession.connect(host, { signal: ac.signal });
    await agent.expect('hello');
    ac.abort(new Error('user pressed ^C'));
    await assert.rejects(connecting, (err: Error) => err instanceof SessionAbortedError && (err.cause as Error).message === 'user pressed ^C');
    await agent.whenClosed();
  });

  it('fails when the stream closes before HELLO', async () => {
    const [host, agentSocket] = await socketPair();
    const connecting = AgentSession.connect(host);
    agentSocket.end();
    await assert.rejects(connecting, AgentConnectionError);
  });
});

describe('AgentSession failures', () => {
  it('rejects exit and destroys the outputs when the agent goes away mid-command', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['sleep', '100'] });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 10 }, { type: 'stdout', data: Buffer.from('partial') });
    const h = await running;
    const stdoutError = once(h.stdout, 'error');
    const mounting = session.mount('/dev/vdb', '/mnt', 'ext4');
    await agent.expect('mount');
    agent.socket.end();
    await assert.rejects(h.exit, AgentConnectionError);
    await assert.rejects(mounting, AgentConnectionError);
    assert.ok((await stdoutError)[0] instanceof AgentConnectionError);
    await assert.rejects(session.sync(), AgentConnectionError);
  });

  it('never leaves an unhandled rejection or error event when nobody listens', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['x'] });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 10 });
    await running; // neither exit nor the streams are looked at
    agent.socket.destroy();
    await sleep(100);
    await assert.rejects(session.sync(), AgentConnectionError);
  });

  it('ends the session on a malformed frame and closes the stream', async () => {
    const { session, agent } = await setup();
    const running = session.exec({ argv: ['x'] });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 10 });
    const h = await running;
    agent.socket.write(Buffer.from('0000000083', 'hex')); // STDOUT with no data
    await assert.rejects(h.exit, (err: Error) => err instanceof ProtocolError && /STDOUT/.test(err.message));
    await agent.whenClosed();
  });

  it('ends the session on well-formed but unexpected messages', async () => {
    for (const stray of [
      { type: 'stdout', data: Buffer.from('x') },
      { type: 'started', pid: 1 },
      { type: 'ok' },
      { type: 'stdinAck', bytes: 1 },
      { type: 'exit', kind: 0, code: 0, message: '' },
      { type: 'error', code: 6, fatal: false, message: 'bad signal' },
    ] satisfies AgentMessage[]) {
      const { session, agent } = await setup();
      agent.send(stray);
      await agent.whenClosed();
      await assert.rejects(session.exec({ argv: ['x'] }), ProtocolError, stray.type);
    }
  });

  it('aborts a command through the exec signal', async () => {
    const { session, agent } = await setup();
    const ac = new AbortController();
    const running = session.exec({ argv: ['sleep', '100'], signal: ac.signal, stdin: true });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 10 });
    const h = await running;
    ac.abort();
    await assert.rejects(h.exit, SessionAbortedError);
    assert.ok(h.stdout.destroyed && h.stdin!.destroyed);
    await agent.whenClosed();
  });

  it('maps OK and ERROR for mount, unmount, sync and poweroff', async () => {
    const { session, agent } = await setup();
    const mounting = session.mount('serial:work', '/work', 'ext4', true);
    assert.deepEqual(
      Object.fromEntries(Object.entries(await agent.expect('mount')).map(([k, v]) => [k, typeof v === 'object' ? String(v) : v])),
      { type: 'mount', flags: 1, device: 'serial:work', mountpoint: '/work', fstype: 'ext4' },
    );
    agent.send({ type: 'ok' });
    await mounting;
    const unmounting = session.unmount('/work');
    await agent.expect('unmount');
    agent.send({ type: 'error', code: 7, fatal: false, message: 'umount /work: Device or resource busy' });
    await assert.rejects(
      unmounting,
      (err: Error) => err instanceof AgentRequestError && err.code === 7 && err.message === 'umount /work: Device or resource busy',
    );
    const off = session.poweroff();
    await agent.expect('poweroff');
    agent.send({ type: 'ok' });
    await off;
    await agent.whenClosed();
    await assert.rejects(session.sync(), /powered off/);
  });
});

describe('AgentSession deadlines', () => {
  async function silentAfterHello(requestTimeoutMs: number): Promise<{ session: AgentSession; agent: FakeAgent }> {
    const [host, agentSocket] = await socketPair();
    const agent = new FakeAgent(agentSocket);
    const [session] = await Promise.all([AgentSession.connect(host, { helloTimeoutMs: 5000, requestTimeoutMs }), agent.handshake()]);
    afterThisTest(() => session.close());
    return { session, agent };
  }

  for (const [what, call] of [
    ['MOUNT', (s: AgentSession) => s.mount('serial:mvm0', '/w', 'ext4')],
    ['UNMOUNT', (s: AgentSession) => s.unmount('/w')],
    ['POWEROFF', (s: AgentSession) => s.poweroff()],
    ['EXEC', (s: AgentSession) => s.exec({ argv: ['true'] })],
  ] as const) {
    it(`a guest that never answers ${what} ends the session with a timeout, naming the request`, async () => {
      const { session, agent } = await silentAfterHello(200);
      await assert.rejects(call(session), (error: unknown) => error instanceof AgentTimeoutError && error.message === `the guest agent did not answer ${what} within 0.2 s`);
      await agent.whenClosed();
      await assert.rejects(session.sync(), AgentTimeoutError);
    });
  }

  it('a command that runs long is not a late answer: the deadline ends at STARTED', async () => {
    const { session, agent } = await silentAfterHello(200);
    const running = session.exec({ argv: ['sleep', '1'] });
    await agent.expect('exec');
    agent.send({ type: 'started', pid: 7 });
    const handle = await running;
    await sleep(400);
    agent.send({ type: 'exit', kind: 0, code: 0, message: '' });
    assert.deepEqual(await handle.exit, { kind: 'exited', code: 0, message: '' });
  });
});
