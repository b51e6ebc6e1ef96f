import { Command, Option } from 'commander';
import { BACKEND_CHOICES, type BackendChoice } from '../backends/index.js';
import { MvmError } from '../errors.js';
import { DEFAULT_CPUS, DEFAULT_MEMORY_MIB } from '../exec/default-image.js';
import { envFromAssignments } from '../launchplan/env.js';
import { progressReporter } from '../progress.js';
import type { AccelChoice } from '../accel/index.js';
import { NET_MODES, type NetMode } from '../net/spec.js';
import { exec } from '../sdk/exec.js';
import { CPUS_RANGE, DEFAULT_TIMEOUT_SECONDS, TIMEOUT_SECONDS_RANGE } from '../sdk/parse.js';
import { accelOption, collect, logLine, parseGuestDir, parseIntegerIn, parseMemory } from './parse.js';
import { runInterruptibly } from './signals.js';

interface ExecFlags {
  cpus: number;
  memory: number;
  timeout: number;
  env: string[];
  envFile: string[];
  workdir?: string;
  interactive?: boolean;
  backend?: BackendChoice;
  accel?: AccelChoice;
  verbose?: boolean;
  launchPlan?: string;
  addDir: string[];
  template?: string;
  manifest?: string;
  /** false with --no-snapshot. */
  snapshot: boolean;
  net?: NetMode;
  allowHost: string[];
  publish: string[];
}

export function execCommand(): Command {
  return new Command('exec')
    .description('boot a fresh microVM, run one command in it, stream its output, and tear the VM down')
    .usage('[options] -- CMD [ARGS...]')
    .argument('[command...]', 'the command and its arguments, run as given (no shell)')
    .option('--cpus <n>', 'virtual CPUs', parseIntegerIn(CPUS_RANGE.min, CPUS_RANGE.max), DEFAULT_CPUS)
    .addOption(new Option('--memory <size>', 'guest memory: K/M/G suffix, bare number = MiB').argParser(parseMemory).default(DEFAULT_MEMORY_MIB, `${DEFAULT_MEMORY_MIB}M`))
    .option('--timeout <seconds>', 'kill the command (exit 124) after this many seconds', parseIntegerIn(TIMEOUT_SECONDS_RANGE.min, TIMEOUT_SECONDS_RANGE.max), DEFAULT_TIMEOUT_SECONDS)
    .option('-e, --env <KEY[=VALUE]>', 'set an environment variable in the guest; KEY alone: its value here, if set (repeatable)', collect, [])
    .option('--env-file <FILE>', 'KEY=VALUE lines (docker run format) for the guest environment; -e wins (repeatable)', collect, [])
    .option('-w, --workdir <DIR>', 'run the command in this absolute guest directory, created if missing', parseGuestDir)
    .option('-i, --interactive', "forward stdin to the command (otherwise its stdin is /dev/null)")
    .addOption(new Option('--backend <name>', 'VMM to use').choices(BACKEND_CHOICES))
    .addOption(accelOption())
    .option('-v, --verbose', 'show the guest console and timings on stderr')
    .option('-d, --add-dir <HOST:GUEST[:ro|rw]>', 'mount a host directory in the guest; rw syncs changes back after a clean exit (repeatable; HOST ends at the first colon)', collect, [])
    .option('--launch-plan <path>', 'run the entrypoint of a launch.json artifact or single-app Workload IR manifest')
    .addOption(new Option('--template <NAME|DIR>', 'boot this template (mvmctl template build), by name or directory, instead of the default image; restores its snapshot when it has one').conflicts('manifest'))
    .option('-m, --manifest <NAME|DIR>', 'the same as --template (upstream mvmctl spelling)')
    .option('--no-snapshot', 'boot cold even when the image or template has a snapshot')
    .addOption(new Option('--net <mode>', "the guest's network: none (no NIC) or user (outbound through the host; default: none, or the template's)").choices(NET_MODES))
    .option('--allow-host <NAME[:PORT]>', 'let the guest reach only this host, over HTTP(S) through a proxy on the host (repeatable; no port: 80 and 443)', collect, [])
    .option('-p, --publish <[ADDRESS:]HOSTPORT:GUESTPORT>', 'forward a host TCP port (on 127.0.0.1 unless ADDRESS is given) to the guest (repeatable)', collect, [])
    .passThroughOptions()
    .action(async (argv: string[], flags: ExecFlags, command: Command) => {
      const env = envFromAssignments(flags.env);
      // Usage errors in the flags' own terms; exec() would name its options instead.
      if (flags.launchPlan !== undefined && argv.length > 0) throw new MvmError('--launch-plan supplies the command: give either it or a command after --, not both');
      if (flags.launchPlan === undefined && argv.length === 0) throw new MvmError('no command given: usage is mvmctl exec [options] -- CMD [ARGS...] (or --launch-plan PATH)');
      // Sizes left at commander's default are not passed, so that a template's own default applies.
      const given = (flag: string) => command.getOptionValueSource(flag) !== 'default';
      process.exitCode = await runInterruptibly(async (signal) => {
        const handle = exec(argv, {
          env,
          envFiles: flags.envFile,
          ...(flags.workdir === undefined ? {} : { cwd: flags.workdir, createCwd: true }),
          cpus: given('cpus') ? flags.cpus : undefined,
          memory: given('memory') ? flags.memory : undefined,
          timeout: flags.timeout,
          addDirs: flags.addDir,
          launchPlan: flags.launchPlan,
          template: flags.template ?? flags.manifest,
          noSnapshot: !flags.snapshot,
          net: flags.net,
          allowHosts: flags.allowHost,
          publish: flags.publish,
          accel: flags.accel,
          backend: flags.backend,
          stdin: flags.interactive,
          signal,
          onProgress: progressReporter({ force: flags.verbose }),
          onWarning: logLine,
          verbose: flags.verbose,
        });
        handle.stdout.pipe(process.stdout, { end: false });
        handle.stderr.pipe(process.stderr, { end: false });
        if (handle.stdin) process.stdin.pipe(handle.stdin);
        try {
          return (await handle.exited).exitCode;
        } finally {
          // A stdin that is no longer piped anywhere stops being read, so mvmctl can exit.
          if (handle.stdin) process.stdin.unpipe(handle.stdin);
        }
      });
    });
}
