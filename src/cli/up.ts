import { constants } from 'node:os';
import { PassThrough } from 'node:stream';
import { text } from 'node:stream/consumers';
import { Command } from 'commander';
import { MvmError } from '../errors.js';
import { envFromAssignments } from '../launchplan/env.js';
import { progressReporter } from '../progress.js';
import type { ExecResult } from '../sdk/exec.js';
import { DEFAULT_TIMEOUT_SECONDS, TIMEOUT_SECONDS_RANGE } from '../sdk/parse.js';
import { consoleRun, startSupervised } from '../supervisor/client.js';
import { supervise, type SupervisedOptions } from '../supervisor/serve.js';
import type { StartReport } from '../supervisor/wire.js';
import { commandOutput, type CommandOutput } from './command-output.js';
import { collect, logLine, parseIntegerIn, parseUserFlag, USER_FLAG_HELP } from './parse.js';
import { Interrupted, runInterruptibly } from './signals.js';
import { terminalSafe } from './terminal-text.js';
import { addVmFlags, vmOptionsFromFlags, type VmFlags } from './vm-flags.js';
import { attachHostTerminal, hostTtySize, refuseJsonWithTty } from './tty.js';

interface UpFlags extends VmFlags {
  name?: string;
  verbose?: boolean;
}

export function upCommand(): Command {
  const command = new Command('up')
    .description('start a microVM that stays up (run commands in it with `mvmctl console`, stop it with `mvmctl down`); prints its name')
    .option('--name <name>', "the VM's name (default: a generated exec-… one)")
    .option('-v, --verbose', 'show the guest console and timings on stderr while it starts');
  return addVmFlags(command, { syncNote: 'at `mvmctl down`' }).action(async (flags: UpFlags) => {
    const options: SupervisedOptions = {
      ...vmOptionsFromFlags(flags),
      ...(flags.name !== undefined ? { name: flags.name } : {}),
      verbose: flags.verbose ?? false,
    };
    process.exitCode = await runInterruptibly(async (signal) => {
      const name = await startSupervised(process.argv[1]!, options, {
        onLine: (line) => process.stderr.write(`${terminalSafe(line)}\n`),
        onProgress: progressReporter({ force: flags.verbose }),
        signal,
      });
      process.stdout.write(`${name}\n`);
      return 0;
    });
  });
}

interface ConsoleFlags {
  command?: string;
  env: string[];
  interactive?: boolean;
  user?: string;
  tty?: boolean;
  timeout: number;
  json?: boolean;
}

export function consoleCommand(): Command {
  return new Command('console')
    .description('run a command in a VM that `mvmctl up` started: streams, and exits with its code, as exec does')
    .usage('NAME (--command "SHELL COMMAND" | -- CMD [ARGS...])')
    .argument('<name>', 'the VM, as `mvmctl up` printed it')
    .argument('[command...]', 'the command and its arguments, run as given (no shell)')
    .option('--command <shell command>', 'run this with /bin/sh -c')
    .option('-e, --env <KEY=VALUE>', 'set an environment variable for the command (repeatable)', collect, [])
    .option('-i, --interactive', 'forward stdin to the command (otherwise its stdin is /dev/null)')
    .option('-u, --user <UID[:GID]>', USER_FLAG_HELP, parseUserFlag)
    .option('-t, --tty', "a terminal for the command in the guest, as docker run -t: stdout and stderr become one stream; with -i and a terminal here, it is put in raw mode so keys such as Ctrl-C go to the guest (size: this terminal's, else 24x80)")
    .option('--timeout <seconds>', 'kill the command (exit 124) after this many seconds', parseIntegerIn(TIMEOUT_SECONDS_RANGE.min, TIMEOUT_SECONDS_RANGE.max), DEFAULT_TIMEOUT_SECONDS)
    .option('--json', 'newline-delimited JSON events on stdout (started, stdout, stderr, exit or error; docs/json-events.md) instead of the raw output')
    .action(async (name: string, argv: string[], flags: ConsoleFlags) => {
      const output = commandOutput(flags.json ?? false);
      process.exitCode = await output.report(() => runConsole(name, argv, flags, output));
    });
}

async function runConsole(name: string, argv: string[], flags: ConsoleFlags, output: CommandOutput): Promise<ExecResult> {
  if ((flags.command === undefined) === (argv.length === 0)) throw new MvmError('give the command either as --command "..." or after --, not both or neither');
  refuseJsonWithTty(flags);
  // The client writes the command's output as it comes; these carry it to the output, and end with the run.
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  output.attach(stdout, stderr);
  try {
    const run = await consoleRun(
      name,
      {
        argv: flags.command !== undefined ? ['/bin/sh', '-c', flags.command] : argv,
        env: envFromAssignments(flags.env),
        ...(flags.user === undefined ? {} : { user: flags.user }),
        timeout: flags.timeout,
        interactive: flags.interactive ?? false,
        ...(flags.tty ? { tty: hostTtySize() } : {}),
      },
      { stdin: process.stdin, stdout, stderr, log: logLine, onStarted: (vm) => output.started(vm, { commandStartedMs: performance.now() }) },
    );
    // The first Ctrl-C (or SIGTERM, SIGHUP) goes to the command, which decides; a second leaves it.
    let interrupted: NodeJS.Signals | undefined;
    const onSignal = (signal: NodeJS.Signals) => {
      if (interrupted) {
        run.detach();
        process.exit(output.abandon(new Interrupted(interrupted)));
      }
      interrupted = signal;
      run.signal(constants.signals[signal]);
    };
    const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
    for (const signal of signals) process.on(signal, onSignal);
    const restoreTerminal = flags.tty ? attachHostTerminal(flags.interactive ?? false, ({ rows, cols }) => run.resize(rows, cols)) : () => {};
    try {
      return await run.exited;
    } finally {
      restoreTerminal();
      for (const signal of signals) process.removeListener(signal, onSignal);
    }
  } finally {
    stdout.end();
    stderr.end();
  }
}

/** The supervisor of an `up` VM (started by `up` itself): its options as JSON on stdin. */
export function superviseCommand(): Command {
  return new Command('__supervise').action(async () => {
    const options = JSON.parse(await text(process.stdin)) as SupervisedOptions;
    // Once `up` has returned, nobody reads these pipes: nothing is written to them then.
    process.stdout.on('error', () => {});
    process.stderr.on('error', () => {});
    const say = (report: StartReport) => process.stdout.write(JSON.stringify(report) + '\n');
    process.exitCode = await supervise(options, {
      line: logLine,
      progress: (line) => say({ progress: line }),
      alive: () => say({ alive: true }),
      ready: (name) => say({ ready: name }),
      failed: (error) => say({ error: { message: error.message, exitCode: error.exitCode, details: error.details } }),
    });
  });
}
