/** A scripted guest agent on the far end of a unix socket, for AgentSession's unit tests. */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  AgentSession,
  Capability,
  encodeAgentFrame,
  HostFrameDecoder,
  type AgentMessage,
  type HostMessage,
} from '../../src/protocol/index.js';

const cleanup: (() => void)[] = [];
/** Registers `f` to run after the current test (closing a session or socket it opened). */
export function afterThisTest(f: () => void): void {
  cleanup.push(f);
}

/** Closes what the last test's sessions and sockets left open: `afterEach(closeSessions)`. */
export function closeSessions(): void {
  for (const f of cleanup.splice(0)) f();
}

/** Two connected unix sockets: [host side, agent side]. */
export async function socketPair(): Promise<[Socket, Socket]> {
  const dir = mkdtempSync(join(tmpdir(), 'mvm-proto-'));
  const server = createServer();
  server.listen(join(dir, 's'));
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const host = connect(join(dir, 's'));
  const [agent] = (await accepted) as [Socket];
  await once(host, 'connect').catch(() => undefined);
  server.close();
  rmSync(dir, { recursive: true, force: true });
  afterThisTest(() => {
    host.destroy();
    agent.destroy();
  });
  return [host, agent];
}

/** The agent's side of the protocol, scripted by each test. */
export class FakeAgent {
  private readonly decoder = new HostFrameDecoder();
  private readonly queue: HostMessage[] = [];
  private wake: (() => void) | null = null;
  /** STDIN payload bytes received, for window checks. */
  stdinBytes = 0;
  closed = false;

  constructor(readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      for (const m of this.decoder.push(chunk)) {
        if (m.type === 'stdin') this.stdinBytes += m.data.byteLength;
        this.queue.push(m);
      }
      this.wake?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
    socket.on('error', () => {});
  }

  async next(): Promise<HostMessage> {
    while (this.queue.length === 0) {
      if (this.closed) throw new Error('host closed the connection');
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = null;
    }
    return this.queue.shift()!;
  }

  async expect<T extends HostMessage['type']>(type: T): Promise<Extract<HostMessage, { type: T }>> {
    const m = await this.next();
    assert.equal(m.type, type);
    return m as Extract<HostMessage, { type: T }>;
  }

  send(...msgs: AgentMessage[]): boolean {
    return this.socket.write(Buffer.concat(msgs.map(encodeAgentFrame)));
  }

  async handshake(version = 1): Promise<void> {
    await this.expect('hello');
    this.send({ type: 'hello', version, capabilities: Capability.EXEC | Capability.MOUNT, agentVersion: 'fake 1.0' });
  }

  async whenClosed(): Promise<void> {
    while (!this.closed) await new Promise<void>((resolve) => (this.wake = resolve));
  }
}

export async function setup(): Promise<{ session: AgentSession; agent: FakeAgent; host: Socket }> {
  const [host, agentSocket] = await socketPair();
  const agent = new FakeAgent(agentSocket);
  const [session] = await Promise.all([AgentSession.connect(host, { helloTimeoutMs: 5000 }), agent.handshake()]);
  afterThisTest(() => session.close());
  return { session, agent, host };
}

export async function collect(r: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of r) parts.push(c as Buffer);
  return Buffer.concat(parts);
}
