/**
 * The HTTP side of the Firecracker test double's API server: request bodies read within a limit,
 * JSON answers and faults as Firecracker writes them, one request at a time, and the unix socket.
 */
import { rm } from 'node:fs/promises';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';

/** Firecracker's micro_http refuses bodies over its limit (51200 bytes by default); the double allows 64 KiB. */
const maxBodyBytes = 64 * 1024;

type RequestBody = { ok: true; text: string } | { ok: false; error: string };

/** Reads at most maxBodyBytes; the rest is drained, not kept, so the answer still reaches the client. */
export async function readBody(req: IncomingMessage): Promise<RequestBody> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size <= maxBodyBytes) chunks.push(chunk);
  }
  if (size > maxBodyBytes) {
    return { ok: false, error: `Request payload with size ${size} is larger than the limit of ${maxBodyBytes} allowed by the test double.` };
  }
  try {
    return { ok: true, text: new TextDecoder('utf-8', { fatal: true }).decode(Buffer.concat(chunks)) };
  } catch {
    return { ok: false, error: 'The request body is not valid UTF-8.' };
  }
}

export function send(res: ServerResponse, status: number, body?: unknown): void {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }).end(text);
}

export function fault(res: ServerResponse, message: string): void {
  send(res, 400, { fault_message: message });
}

/** Firecracker's API thread handles one request at a time; so does the double, machine calls included. */
export function serializer(): <T>(task: () => Promise<T>) => Promise<T> {
  let tail: Promise<unknown> = Promise.resolve();
  return (task) => {
    const run = tail.then(task);
    tail = run.catch(() => undefined);
    return run;
  };
}

export function listen(server: Server, socketPath: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

export async function closeServer(server: Server, socketPath: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    server.close((err) => (err ? reject(err) : resolve()));
    server.closeAllConnections();
  });
  await rm(socketPath, { force: true });
}
