/**
 * Where `exec` and `console` put the command's output and how their run ends: on the terminal's
 * own streams (the exit code says the rest; mvmctl's failure is one `mvmctl: …` line, printed by
 * main), or, with --json, as events on stdout (json-events.ts) ending in `exit` or `error`.
 */
import type { Readable, Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import type { Command } from 'commander';
import type { ExecResult } from '../sdk/exec.js';
import { describeFailure, printDebugStack } from './failure.js';
import { errorEvent, EventWriter, exitEvent, type StartedTimings } from './json-events.js';

export interface CommandOutput {
  /** Sends the command's output where it goes; both streams must end once the run is over. */
  attach(stdout: Readable, stderr: Readable): void;
  /** The command has started in the guest; `timings` are milliseconds since `origin` (a performance.now(); 0 is mvmctl's start). */
  started(name: string, timings: StartedTimings, origin?: number): void;
  /** Runs the command and resolves with mvmctl's exit code. */
  report(run: () => Promise<ExecResult>): Promise<number>;
  /** Leaving at once, before the run is over (output still on its way is dropped): returns the exit code `error` gives. */
  abandon(error: unknown): number;
}

/** The terminal's output, or with `json` events on `out`. */
export function commandOutput(json: boolean, out: Writable = process.stdout): CommandOutput {
  return json ? new JsonOutput(new EventWriter(out)) : terminalOutput;
}

const terminalOutput: CommandOutput = {
  attach(stdout, stderr) {
    stdout.pipe(process.stdout, { end: false });
    stderr.pipe(process.stderr, { end: false });
  },
  started() {},
  report: async (run) => (await run()).exitCode,
  abandon: (error) => describeFailure(error).exitCode,
};

/** Every run ends in one `exit` or `error` event, after all its output events. */
class JsonOutput implements CommandOutput {
  private readonly outputs: Writable[] = [];

  constructor(private readonly events: EventWriter) {}

  attach(stdout: Readable, stderr: Readable): void {
    for (const [source, type] of [[stdout, 'stdout'], [stderr, 'stderr']] as const) {
      const events = this.events.output(type);
      this.outputs.push(events);
      source.pipe(events);
    }
  }

  started(name: string, timings: StartedTimings, origin = 0): void {
    const since = (ms: number) => Math.round(origin + ms);
    const sinceStart = { ...(timings.vmReadyMs !== undefined ? { vmReadyMs: since(timings.vmReadyMs) } : {}), commandStartedMs: since(timings.commandStartedMs) };
    this.events.write({ type: 'started', name, timings: sinceStart });
  }

  async report(run: () => Promise<ExecResult>): Promise<number> {
    try {
      const result = await run();
      await this.outputDone();
      this.events.write(exitEvent(result));
      return result.exitCode;
    } catch (error) {
      await this.outputDone();
      return this.fail(error);
    }
  }

  abandon(error: unknown): number {
    return this.fail(error);
  }

  /** The output events are all written: their sources have ended (a run's streams end however it ends). */
  private async outputDone(): Promise<void> {
    await Promise.all(this.outputs.map((events) => finished(events)));
  }

  private fail(error: unknown): number {
    printDebugStack(error);
    const failure = describeFailure(error);
    this.events.write(errorEvent(failure));
    return failure.exitCode;
  }
}

/**
 * Whether an `exec` or `console` command line asks for --json, read before commander parses it:
 * a flag that commander refuses may come before `--json`, and its error is then an event too.
 * Read as commander reads it: an option's value is not an option, and the options end at `--`,
 * and for exec (whose options after CMD are CMD's) at the first operand.
 */
export function jsonRequested(root: Command, args: readonly string[]): boolean {
  const [name, ...rest] = args;
  const command = name === 'exec' || name === 'console' ? root.commands.find((c) => c.name() === name) : undefined;
  if (command === undefined) return false;
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i]!;
    if (arg === '--') return false;
    if (arg === '--json') return true;
    if (!arg.startsWith('-') || arg === '-') {
      if (name === 'exec') return false;
      continue;
    }
    const option = command.options.find((o) => o.long === arg || o.short === arg);
    if (option?.required || (option?.optional && !rest[i + 1]?.startsWith('-'))) i++;
  }
  return false;
}
