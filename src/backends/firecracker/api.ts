/**
 * Firecracker's API: HTTP/1.1 with JSON bodies on the unix socket given by `--api-sock`
 * (firecracker-api.yaml, v1.16). Each call has a deadline; an error answer becomes one line naming
 * the call and Firecracker's `fault_message`.
 */
import { request } from 'node:http';
import { MvmError } from '../../errors.js';

/** Answers are a few hundred bytes (errors, GET /); a bigger one was not written by Firecracker. */
const MAX_ANSWER_BYTES = 64 * 1024;
/** Configuration calls answer at once; snapshot calls write the guest's RAM and may take a while. */
export const API_TIMEOUT_MS = 10_000;
export const SNAPSHOT_API_TIMEOUT_MS = 120_000;

export class FirecrackerApiError extends MvmError {
  constructor(readonly call: string, readonly status: number | undefined, readonly faultMessage: string) {
    super(`Firecracker refused ${call}: ${faultMessage}`, 125);
  }
}

export interface ApiCallOptions {
  signal: AbortSignal;
  timeoutMs?: number;
}

export class FirecrackerApi {
  constructor(private readonly socketPath: string) {}

  put(path: string, body: unknown, options: ApiCallOptions): Promise<unknown> {
    return this.call('PUT', path, body, options);
  }

  patch(path: string, body: unknown, options: ApiCallOptions): Promise<unknown> {
    return this.call('PATCH', path, body, options);
  }

  get(path: string, options: ApiCallOptions): Promise<unknown> {
    return this.call('GET', path, undefined, options);
  }

  private call(method: string, path: string, body: unknown, options: ApiCallOptions): Promise<unknown> {
    const name = `${method} ${path}`;
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const signal = AbortSignal.any([options.signal, AbortSignal.timeout(options.timeoutMs ?? API_TIMEOUT_MS)]);
    return new Promise((resolve, reject) => {
      const req = request(
        {
          socketPath: this.socketPath,
          method,
          path,
          headers: { accept: 'application/json', ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}) },
          signal,
        },
        (res) => {
          const chunks: Buffer[] = [];
          let size = 0;
          res.on('data', (chunk: Buffer) => {
            size += chunk.length;
            if (size > MAX_ANSWER_BYTES) return res.destroy(new MvmError(`Firecracker's answer to ${name} is larger than ${MAX_ANSWER_BYTES} bytes`));
            chunks.push(chunk);
          });
          res.on('error', reject);
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            const status = res.statusCode ?? 0;
            if (status >= 200 && status < 300) return resolve(text ? parseJson(text) : undefined);
            reject(new FirecrackerApiError(name, status, faultMessage(text) ?? `HTTP ${status}`));
          });
        },
      );
      req.on('error', (error) => {
        if (options.signal.aborted) return reject(options.signal.reason);
        if (signal.aborted) return reject(new FirecrackerApiError(name, undefined, `no answer within ${(options.timeoutMs ?? API_TIMEOUT_MS) / 1000} s`));
        reject(new FirecrackerApiError(name, undefined, error.message));
      });
      req.end(payload);
    });
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Firecracker's error body: `{"fault_message": "..."}`, shown on one line. */
function faultMessage(text: string): string | undefined {
  const body = parseJson(text) as { fault_message?: unknown } | string;
  const message = typeof body === 'object' && body !== null && typeof body.fault_message === 'string' ? body.fault_message : text.trim();
  return message ? message.replace(/\s*\n\s*/g, ' ').slice(0, 500) : undefined;
}
