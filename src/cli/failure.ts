/** mvmctl's own failures as the CLI reports them: one `mvmctl: …` line on stderr, or exec's and console's --json error event. */
import { CommanderError } from 'commander';
import { EXIT_MVM_FAILURE, MvmError } from '../errors.js';
import { Interrupted } from './signals.js';
import { terminalSafe } from './terminal-text.js';

export interface Failure {
  /** One line: the cause and, where there is one, the fix. */
  message: string;
  exitCode: number;
  /** Lines shown after it, e.g. the tail of the guest console after a failed boot. */
  details: string[];
}

/** What `error` says to the user and the code mvmctl exits with. */
export function describeFailure(error: unknown): Failure {
  if (error instanceof CommanderError) return { message: error.message.replace(/^error: /, ''), exitCode: EXIT_MVM_FAILURE, details: [] };
  if (error instanceof MvmError) return { message: error.message, exitCode: error.exitCode, details: [...error.details] };
  if (error instanceof Interrupted) return { message: error.message, exitCode: error.exitCode, details: [] };
  // Anything else is a bug of mvmctl's.
  const message = error instanceof Error ? error.message : String(error);
  return { message: `internal error: ${message} (set MVM_DEBUG=1 for details)`, exitCode: EXIT_MVM_FAILURE, details: [] };
}

/** The stack of an error mvmctl did not expect, on stderr, with MVM_DEBUG=1 (in either output mode). */
export function printDebugStack(error: unknown): void {
  const expected = error instanceof CommanderError || error instanceof MvmError || error instanceof Interrupted;
  if (process.env.MVM_DEBUG === '1' && !expected && error instanceof Error) process.stderr.write(`${error.stack}\n`);
}

/** The failure as lines on stderr. */
export function printFailure(failure: Failure): void {
  process.stderr.write(`mvmctl: ${terminalSafe(failure.message)}\n`);
  for (const line of failure.details) process.stderr.write(`  | ${terminalSafe(line)}\n`);
}
