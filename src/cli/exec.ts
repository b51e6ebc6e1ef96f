import { Command, Option } from 'commander';
import { BACKEND_CHOICES, selectBackend, type BackendChoice } from '../backends/index.js';
import { MvmError } from '../errors.js';
import { parseAddDirSpec, validateAddDirs } from '../dirsync/index.js';
import { execInMicroVm } from '../exec/run.js';
import { DEFAULT_CPUS, DEFAULT_MEMORY_MIB, defaultBootImage } from '../exec/default-image.js';
import { mergeEnv, parseEnvAssignment } from '../launchplan/env.js';
import type { LaunchPlan } from '../launchplan/index.js';
import { progressReporter } from '../progress.js';
import { requireTemplate, templateBootImage } from '../templates/index.js';
import { accelChoice, type AccelChoice } from '../accel/index.js';
import { accelOption, bootTimeoutFromEnv, collect, logLine, parseIntegerIn, parseMemory } from './parse.js';
import { runInterruptibly } from './signals.js';

interface ExecOptions {
  cpus: number;
  memory: number;
  timeout: number;
  env: string[];
  interactive?: boolean;
  backend: BackendChoice;
  accel?: AccelChoice;
  verbose?: boolean;
  launchPlan?: string;
  addDir: string[];
  manifest?: string;
  /** false with --no-snapshot. */
  snapshot: boolean;
}

export function execCommand(): Command {
  return new Command('exec')
    .description('boot a fresh microVM, run one command in it, stream its output, and tear the VM down')
    .usage('[options] -- CMD [ARGS...]')
    .argument('[command...]', 'the command and its arguments, run as given (no shell)')
    .option('--cpus <n>', 'virtual CPUs', parseIntegerIn(1, 64), DEFAULT_CPUS)
    .addOption(new Option('--memory <size>', 'guest memory: K/M/G suffix, bare number = MiB').argParser(parseMemory).default(DEFAULT_MEMORY_MIB, `${DEFAULT_MEMORY_MIB}M`))
    .option('--timeout <seconds>', 'kill the command (exit 124) after this many seconds', parseIntegerIn(1, 7 * 24 * 3600), 60)
    .option('-e, --env <KEY=VALUE>', 'set an environment variable in the guest (repeatable)', collect, [])
    .option('-i, --interactive', "forward stdin to the command (otherwise its stdin is /dev/null)")
    .addOption(new Option('--backend <name>', 'VMM to use').choices(BACKEND_CHOICES).default('auto'))
    .addOption(accelOption())
    .option('-v, --verbose', 'show the guest console and timings on stderr')
    .option('--add-dir <HOST:GUEST[:ro|rw]>', 'mount a host directory in the guest; rw syncs changes back after a clean exit (repeatable)', collect, [])
    .option('--launch-plan <path>', 'run the entrypoint of a launch.json artifact or single-app Workload IR manifest')
    .option('--manifest <name>', 'boot this template (mvmctl template build) instead of the default image; restores its snapshot when it has one')
    .option('--no-snapshot', 'boot cold even when the image or template has a snapshot')
    .passThroughOptions()
    .action(async (argv: string[], options: ExecOptions, command: Command) => {
      const cliEnv = Object.fromEntries(options.env.map(parseEnvAssignment));
      let plan: LaunchPlan | undefined;
      if (options.launchPlan !== undefined) {
        if (argv.length > 0) throw new MvmError('--launch-plan supplies the command: give either it or a command after --, not both');
        // Loaded on use: the schema library costs a noticeable part of every exec's start-up.
        const { loadLaunchPlan } = await import('../launchplan/index.js');
        plan = await loadLaunchPlan(options.launchPlan);
      } else if (argv.length === 0) {
        throw new MvmError('no command given: usage is mvmctl exec [options] -- CMD [ARGS...] (or --launch-plan PATH)');
      }
      const addDirs = options.addDir.map((spec) => parseAddDirSpec(spec, process.cwd()));
      validateAddDirs(addDirs);
      const backend = selectBackend(options.backend);
      // A template brings its own default size; --cpus / --memory given on the command line win.
      const template = options.manifest !== undefined ? await requireTemplate(options.manifest) : undefined;
      if (template) {
        if (command.getOptionValueSource('cpus') === 'default') options.cpus = template.meta.cpus;
        if (command.getOptionValueSource('memory') === 'default') options.memory = template.meta.memoryMiB;
      }
      const bootTimeoutMs = bootTimeoutFromEnv();
      const log = logLine;
      const snapshotRequest = { cpus: options.cpus, memoryMiB: options.memory, addDirs: addDirs.length, noSnapshot: !options.snapshot };
      const ensureImage = template
        ? async () => templateBootImage(template, backend, snapshotRequest)
        : defaultBootImage({ backend, request: snapshotRequest, bootTimeoutMs, log });
      const accel = accelChoice(options.accel);
      if (plan && options.verbose) for (const field of plan.ignoredFields) log(`launch plan: ignored field ${field}`);
      process.exitCode = await runInterruptibly((signal) =>
        execInMicroVm(
          {
            argv: plan?.argv ?? argv,
            // Lowest to highest precedence: the plan's env (app/top-level < entrypoint), then -e.
            env: mergeEnv(plan?.env ?? {}, cliEnv),
            cwd: plan?.cwd,
            createCwd: plan !== undefined,
            cpus: options.cpus,
            memoryMiB: options.memory,
            timeoutSeconds: options.timeout,
            interactive: options.interactive ?? false,
            addDirs,
          },
          {
            stdin: process.stdin,
            stdout: process.stdout,
            stderr: process.stderr,
            log,
            verbose: options.verbose ?? false,
            progress: progressReporter({ force: options.verbose }),
          },
          { backend, ensureImage, bootTimeoutMs, accel },
          signal,
        ).then((result) => result.exitCode),
      );
    });
}
