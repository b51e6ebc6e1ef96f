import { constants } from 'node:os';

const FORWARDED: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

/** The reason an interrupted run was aborted with. */
export class Interrupted extends Error {
  constructor(readonly signal: NodeJS.Signals) {
    super(`interrupted by ${signal}`);
  }

  /** The shell convention for death by a signal: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP. */
  get exitCode(): number {
    return 128 + constants.signals[this.signal];
  }
}

/**
 * Runs `work` with an AbortSignal that fires on SIGINT, SIGTERM or SIGHUP (or a broken output pipe). The work tears down in
 * its own `finally` blocks; once it has settled the run ends with 128+N for the signal that came.
 */
export async function runInterruptibly(work: (signal: AbortSignal) => Promise<number>): Promise<number> {
  const controller = new AbortController();
  const onSignal = (signal: NodeJS.Signals) => {
    if (!controller.signal.aborted) controller.abort(new Interrupted(signal));
  };
  // A closed stdout or stderr (`mvmctl exec … | head`) ends the run the way SIGPIPE ends a shell
  // pipeline's writer (exit 141), with the VM torn down, instead of an unhandled EPIPE.
  const onOutputError = (error: NodeJS.ErrnoException) => {
    if (error.code !== 'EPIPE') throw error;
    onSignal('SIGPIPE');
  };
  for (const signal of FORWARDED) process.on(signal, onSignal);
  process.stdout.on('error', onOutputError);
  process.stderr.on('error', onOutputError);
  try {
    return await work(controller.signal);
  } catch (error) {
    if (controller.signal.aborted) return (controller.signal.reason as Interrupted).exitCode;
    throw error;
  } finally {
    for (const signal of FORWARDED) process.removeListener(signal, onSignal);
  }
}
