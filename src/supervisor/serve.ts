/**
 * The supervisor of a long-lived VM (`mvmctl up`): a detached process that owns the VM (its VMM
 * dies with it, by the parent-death signal) and serves its control socket: `console` runs commands
 * through it, `down` stops it. It stops the VM cleanly (rw directories synced back) on a stop
 * request, SIGTERM, SIGINT or SIGHUP, and exits when the VM does.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { Writable } from 'node:stream';
import { MvmError } from '../errors.js';
import { MicroVm } from '../sdk/microvm.js';
import type { VmOptions } from '../sdk/options.js';
import { vmRunDir } from '../state/registry.js';
import { controlSocketPath, HEARTBEAT_MS, readMessages, send, type SupervisorMessage } from './wire.js';

/** What `up` hands its supervisor: VmOptions that survive JSON. */
export type SupervisedOptions = Omit<VmOptions, 'signal' | 'onProgress' | 'onWarning' | 'label'>;

export interface SupervisorReport {
  /** Lines for the user while `up` still waits (warnings, -v). */
  line(text: string): void;
  /** Progress of long work while `up` still waits (building the image or a flake): shown on a terminal or with -v. */
  progress(text: string): void;
  /** Said every HEARTBEAT_MS while the VM starts, so that `up` can tell a long build from a supervisor that hangs. */
  alive(): void;
  ready(name: string): void;
  failed(error: MvmError): void;
}

const STOP_SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];

/** Runs the VM until it is stopped or dies; resolves with the supervisor's exit code. */
export async function supervise(options: SupervisedOptions, report: SupervisorReport): Promise<number> {
  const startAbort = new AbortController();
  const onStartSignal = (signal: NodeJS.Signals) => startAbort.abort(new MvmError(`interrupted by ${signal} while starting`));
  for (const signal of STOP_SIGNALS) process.once(signal, onStartSignal);
  // Until `up` has returned, lines go to it; after, to the clients asking for a stop.
  let sink: (line: string) => void = report.line;
  let progressSink: (line: string) => void = report.progress;
  let vm: MicroVm;
  const heartbeat = setInterval(() => report.alive(), HEARTBEAT_MS);
  try {
    vm = await MicroVm.start({
      ...options,
      label: ['(up)'],
      signal: startAbort.signal,
      onWarning: (line) => sink(line),
      onProgress: (line) => progressSink(line),
    });
  } catch (error) {
    report.failed(error instanceof MvmError ? error : new MvmError((error as Error).message));
    return 125;
  } finally {
    clearInterval(heartbeat);
    for (const signal of STOP_SIGNALS) process.removeListener(signal, onStartSignal);
  }

  const stopClients = new Set<Socket>();
  let stopping: Promise<void> | undefined;
  const stop = () => {
    stopping ??= vm.stop().catch((error: Error) => sink(`stopping ${vm.name}: ${error.message}`));
    return stopping;
  };
  sink = (line) => {
    for (const client of stopClients) send(client, { type: 'log', line });
  };
  progressSink = sink;
  const server = createServer((socket) => serveClient(socket, vm, { onStop: (client) => (stopClients.add(client), void stop()) }));
  await listen(server, controlSocketPath(vmRunDir(vm.name)!));
  for (const signal of STOP_SIGNALS) process.on(signal, () => void stop());
  report.ready(vm.name);

  // Closed by a stop (request or signal), or by the VM dying; a dead VM's stop only cleans up.
  await vm.closed;
  await stop();
  for (const client of stopClients) {
    send(client, { type: 'stopped' });
    client.end();
  }
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return 0;
}

function listen(server: Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

/** One client: an `exec` (a command, streamed back) or a `stop`; anything else ends the connection. */
function serveClient(socket: Socket, vm: MicroVm, { onStop }: { onStop: (socket: Socket) => void }): void {
  socket.on('error', () => socket.destroy());
  let handle: ReturnType<MicroVm['exec']> | undefined;
  readMessages(socket, (message) => {
    if (message.type === 'stop' && !handle) return onStop(socket);
    if (message.type === 'exec' && !handle) {
      handle = startCommand(socket, vm, message);
      return;
    }
    if (!handle) return socket.destroy();
    if (message.type === 'stdin' && typeof message.data === 'string') {
      // The guest takes stdin at its own pace: stop reading the client until it has.
      if (handle.stdin && !handle.stdin.write(Buffer.from(message.data, 'base64'))) {
        socket.pause();
        handle.stdin.once('drain', () => socket.resume());
      }
    } else if (message.type === 'stdin-eof') handle.stdin?.end();
    else if (message.type === 'signal' && typeof message.signal === 'number') handle.kill(message.signal);
    else if (message.type === 'resize' && typeof message.rows === 'number' && typeof message.cols === 'number') {
      try {
        handle.resize(message.rows, message.cols);
      } catch {
        socket.destroy();
      }
    } else socket.destroy();
  });
  // A client that goes away takes its command with it.
  socket.once('close', () => handle?.kill('SIGKILL'));
}

function startCommand(socket: Socket, vm: MicroVm, message: Record<string, unknown>): ReturnType<MicroVm['exec']> {
  const handle = vm.exec(Array.isArray(message.argv) ? (message.argv as string[]) : [], {
    env: (message.env ?? {}) as Record<string, string>,
    ...(typeof message.cwd === 'string' ? { cwd: message.cwd } : {}),
    ...(typeof message.timeout === 'number' ? { timeout: message.timeout } : {}),
    ...(typeof message.user === 'string' ? { user: message.user } : {}),
    stdin: message.stdin === true,
    ...(message.tty && typeof message.tty === 'object' ? { tty: message.tty as { rows: number; cols: number } } : {}),
    onStarted: ({ name }) => send(socket, { type: 'started', name }),
    onWarning: (line) => send(socket, { type: 'log', line }),
  });
  const relay = (type: 'stdout' | 'stderr') =>
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        // The client reads at its pace; the guest command waits for it (the session's backpressure).
        if (socket.destroyed || send(socket, { type, data: chunk.toString('base64') })) callback();
        else socket.once('drain', () => callback());
      },
    });
  const output = Promise.all([pipeTo(handle.stdout, relay('stdout')), pipeTo(handle.stderr, relay('stderr'))]);
  void handle.exited
    .then(async (result): Promise<SupervisorMessage> => {
      await output;
      return { type: 'exit', exitCode: result.exitCode, ...(result.signal ? { signal: result.signal } : {}), timedOut: result.timedOut };
    })
    .catch((error: unknown): SupervisorMessage => {
      const mvm = error instanceof MvmError ? error : new MvmError(String((error as Error)?.message ?? error));
      return { type: 'error', message: mvm.message, exitCode: mvm.exitCode, details: [...mvm.details] };
    })
    .then((last) => {
      if (!socket.destroyed) socket.end(JSON.stringify(last) + '\n');
    });
  return handle;
}

function pipeTo(source: NodeJS.ReadableStream, sink: Writable): Promise<void> {
  return new Promise((resolve) => {
    source.pipe(sink);
    source.once('end', resolve);
    source.once('close', resolve);
  });
}
