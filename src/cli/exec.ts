import { Command } from 'commander';
import { MvmError } from '../errors.js';
import { envFromAssignments } from '../launchplan/env.js';
import { progressReporter } from '../progress.js';
import { exec, type ExecResult } from '../sdk/exec.js';
import { DEFAULT_TIMEOUT_SECONDS, TIMEOUT_SECONDS_RANGE } from '../sdk/parse.js';
import { commandOutput, type CommandOutput } from './command-output.js';
import { collect, logLine, parseGuestDir, parseIntegerIn, parseUserFlag, USER_FLAG_HELP } from './parse.js';
import { runInterruptibly } from './signals.js';
import { attachHostTerminal, hostTtySize, refuseJsonWithTty } from './tty.js';
import { addVmFlags, vmOptionsFromFlags, type VmFlags } from './vm-flags.js';

interface ExecFlags extends VmFlags {
  timeout: number;
  env: string[];
  envFile: string[];
  workdir?: string;
  user?: string;
  interactive?: boolean;
  tty?: boolean;
  verbose?: boolean;
  launchPlan?: string;
  json?: boolean;
}

export function execCommand(): Command {
  const command = new Command('exec')
    .description('boot a fresh microVM, run one command in it, stream its output, and tear the VM down')
    .usage('[options] -- CMD [ARGS...]')
    .argument('[command...]', 'the command and its arguments, run as given (no shell)')
    .option('--timeout <seconds>', 'kill the command (exit 124) after this many seconds', parseIntegerIn(TIMEOUT_SECONDS_RANGE.min, TIMEOUT_SECONDS_RANGE.max), DEFAULT_TIMEOUT_SECONDS)
    .option('-e, --env <KEY[=VALUE]>', 'set an environment variable in the guest; KEY alone: its value here, if set (repeatable)', collect, [])
    .option('--env-file <FILE>', 'KEY=VALUE lines (docker run format) for the guest environment; -e wins (repeatable)', collect, [])
    .option('-w, --workdir <DIR>', 'run the command in this absolute guest directory, created if missing', parseGuestDir)
    .option('-u, --user <UID[:GID]>', USER_FLAG_HELP, parseUserFlag)
    .option('-i, --interactive', "forward stdin to the command (otherwise its stdin is /dev/null)")
    .option('-t, --tty', "a terminal for the command in the guest, as docker run -t: stdout and stderr become one stream; with -i and a terminal here, it is put in raw mode so keys such as Ctrl-C go to the guest (size: this terminal's, else 24x80)")
    .option('-v, --verbose', 'show the guest console and timings on stderr')
    .option('--launch-plan <path>', 'run the entrypoint of a launch.json artifact or single-app Workload IR manifest')
    .option('--json', 'newline-delimited JSON events on stdout (started, stdout, stderr, exit or error; docs/json-events.md) instead of the raw output');
  return addVmFlags(command, { syncNote: 'after a clean exit' })
    .passThroughOptions()
    .action(async (argv: string[], flags: ExecFlags) => {
      const output = commandOutput(flags.json ?? false);
      process.exitCode = await runInterruptibly((signal) => output.report(() => run(argv, flags, output, signal)));
    });
}

async function run(argv: string[], flags: ExecFlags, output: CommandOutput, signal: AbortSignal): Promise<ExecResult> {
  const env = envFromAssignments(flags.env);
  // Usage errors in the flags' own terms; exec() would name its options instead.
  if (flags.launchPlan !== undefined && argv.length > 0) throw new MvmError('--launch-plan supplies the command: give either it or a command after --, not both');
  if (flags.launchPlan === undefined && argv.length === 0) throw new MvmError('no command given: usage is mvmctl exec [options] -- CMD [ARGS...] (or --launch-plan PATH)');
  refuseJsonWithTty(flags);
  // The SDK's timings count from this call.
  const calledAt = performance.now();
  const handle = exec(argv, {
    ...vmOptionsFromFlags(flags),
    env,
    envFiles: flags.envFile,
    ...(flags.workdir === undefined ? {} : { cwd: flags.workdir, createCwd: true }),
    ...(flags.user === undefined ? {} : { user: flags.user }),
    timeout: flags.timeout,
    launchPlan: flags.launchPlan,
    stdin: flags.interactive,
    ...(flags.tty ? { tty: hostTtySize() } : {}),
    signal,
    onStarted: ({ name, timings }) => output.started(name, timings, calledAt),
    onProgress: progressReporter({ force: flags.verbose }),
    onWarning: logLine,
    verbose: flags.verbose,
  });
  output.attach(handle.stdout, handle.stderr);
  if (handle.stdin) process.stdin.pipe(handle.stdin);
  const restoreTerminal = flags.tty ? attachHostTerminal(flags.interactive ?? false, ({ rows, cols }) => handle.resize(rows, cols)) : () => {};
  try {
    return await handle.exited;
  } finally {
    restoreTerminal();
    // A stdin that is no longer piped anywhere stops being read, so mvmctl can exit.
    if (handle.stdin) process.stdin.unpipe(handle.stdin);
  }
}
