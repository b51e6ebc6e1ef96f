/**
 * exec()'s options, checked and resolved into the lifecycle's request and dependencies
 * (src/exec/run.ts): sizes and limits, the environment and env files, --add-dir specs, a launch plan, a template.
 * Every problem is an MvmError found before any VM starts.
 */
import { accelChoice, ACCEL_CHOICES, type AccelChoice } from '../accel/index.js';
import { BACKEND_CHOICES, backendChoice, selectBackend, type Backend, type BackendChoice } from '../backends/index.js';
import { resolveAddDir, splitAddDirSpec, validateAddDirs, type AddDirParts } from '../dirsync/index.js';
import { DEFAULT_CPUS, DEFAULT_MEMORY_MIB, defaultBootImage, type DefaultImageOptions } from '../exec/default-image.js';
import type { CommandRequest } from '../exec/command.js';
import type { VmRequest } from '../exec/microvm.js';
import type { ExecDeps, ExecRequest } from '../exec/run.js';
import { ENV_KEY_RULE, isValidEnvKey, mergeEnv, readEnvFiles } from '../launchplan/env.js';
import type { LaunchPlan } from '../launchplan/index.js';
import { planNetwork, type NetMode } from '../net/spec.js';
import { checkVmName } from '../state/registry.js';
import { openTemplate, templateBootImage } from '../templates/index.js';
import { flakeBootImage, flakeRefProblem } from '../flake/index.js';
import type { ExecStarted } from './exec.js';
import { bootTimeoutFromEnv, checkGuestString, CPUS_RANGE, DEFAULT_TIMEOUT_SECONDS, integerIn, InvalidOptionError, parseMemory, parseUser, TIMEOUT_SECONDS_RANGE, type UserSpec } from './parse.js';

/** A host directory in the guest: `'HOST:GUEST[:ro|rw]'` as `--add-dir` takes it, or its parts. ro is the default. */
export type AddDir = string | { host: string; guest: string; mode?: 'ro' | 'rw' };

export interface ExecOptions {
  /** Environment variables of the command, on top of the guest's PATH and HOME; nothing from the host's leaks in. */
  env?: Readonly<Record<string, string>>;
  /**
   * Files of variables in docker's `--env-file` format (`KEY=VALUE` lines, taken literally; a line
   * `KEY` alone takes this process's value, if set). Later files win; `env` wins over them all.
   */
  envFiles?: readonly string[];
  /** Absolute working directory in the guest (default `/`; a launch plan's `working_dir`). */
  cwd?: string;
  /** Create the working directory (and its parents) when missing, as docker run's `-w` does; default: only for a launch plan's `working_dir`. */
  createCwd?: boolean;
  /**
   * Run the command as this user: `'UID[:GID]'`, a UID, or `{ uid, gid }` (default root). Without a
   * GID, the user's primary group in the guest's /etc/passwd, or the UID's own number.
   */
  user?: UserSpec;
  /** Virtual CPUs, 1–64 (default 2, or the template's). */
  cpus?: number;
  /** Guest memory: `'1G'`, `'768M'`, or a number of MiB (default 512, or the template's). */
  memory?: string | number;
  /** Seconds before the command's process group is killed and `exited` gives 124 (default 60). */
  timeout?: number;
  /** Host directories to mount in the guest; rw ones are synced back after the command exits. */
  addDirs?: readonly AddDir[];
  /**
   * The guest's network: `'none'` (no NIC; the default, or the template's) or `'user'` (outbound
   * TCP/UDP through the host's network stack, QEMU user-mode networking).
   */
  net?: NetMode;
  /**
   * `NAME[:PORT]` (or `*.domain`) the guest may reach, and nothing else: HTTP(S) through a proxy on
   * the host, named to the command in HTTP_PROXY/HTTPS_PROXY. No port: 80 and 443.
   */
  allowHosts?: readonly string[];
  /** `[ADDRESS:]HOSTPORT:GUESTPORT`: host TCP ports forwarded to the guest (ADDRESS 127.0.0.1 unless given). */
  publish?: readonly string[];
  /**
   * Boot this template (`mvmctl template build NAME`) instead of the default image: its name, or the
   * path of its directory (holding a `/` or starting with `.`; a NAME symlink or a version directory).
   */
  template?: string;
  /**
   * Boot the guest a Nix flake builds instead (`nix build REF`; see README "--flake" for the output
   * it must have): `'./dir'`, `'path:/abs/dir'`, `'github:owner/repo#attr'`. Cached under the flake's
   * locked hash. Not with `template`. Without a working Nix it fails with NixUnavailableError (125).
   */
  flake?: string;
  /** Boot cold even when the image or template has a snapshot. */
  noSnapshot?: boolean;
  /** Default: `MVM_ACCEL`, else auto (KVM where it can run the guest, else TCG). */
  accel?: AccelChoice;
  backend?: BackendChoice;
  /** Run the entrypoint of this launch.json or single-app Workload IR manifest; argv must then be empty. */
  launchPlan?: string;
  /** Give the command a stdin stream (`handle.stdin`); otherwise its stdin is /dev/null. */
  stdin?: boolean;
  /**
   * Run the command on a terminal in the guest, as `docker run -t`: `true` for 24 rows by 80
   * columns, or a size. Its stdout and stderr are then one stream, `handle.stdout`; `handle.resize()`
   * changes the size. Needs an image whose agent supports it (TtyUnavailableError otherwise).
   */
  tty?: boolean | { rows: number; cols: number };
  /** Aborting it tears the VM down; `exited` then rejects with its reason. */
  signal?: AbortSignal;
  /** Called once the command has started in the guest (not for one that could not be executed: `exited` then gives 126/127). */
  onStarted?: (started: ExecStarted) => void;
  /** Progress of long work (building the default image, syncing large directories), one line each. */
  onProgress?: (line: string) => void;
  /** Warnings, one line each (the CLI prints them as `mvmctl: …`); with `verbose` also timings and the guest console. */
  onWarning?: (line: string) => void;
  verbose?: boolean;
}

/** Where VMs come from: the real backends and default image, or a test's stand-ins. */
export interface VmProvider {
  backend: (choice: BackendChoice) => Backend;
  defaultImage: (options: DefaultImageOptions) => ExecDeps['ensureImage'];
  /** The image a `flake` option boots (default: built with nix, src/flake/). */
  flakeImage?: (ref: string) => ExecDeps['ensureImage'];
}

export const qemuProvider: VmProvider = { backend: selectBackend, defaultImage: defaultBootImage, flakeImage: flakeBootImage };

/** What a VM is, as opposed to a command in it: the options `MicroVm.start` takes. */
export type VmOptions = Pick<
  ExecOptions,
  'cpus' | 'memory' | 'addDirs' | 'template' | 'flake' | 'noSnapshot' | 'accel' | 'backend' | 'net' | 'allowHosts' | 'publish' | 'signal' | 'onProgress' | 'onWarning' | 'verbose'
> & {
  /** The VM's name in `mvmctl ls` (letters, digits, . _ -); default: a generated `exec-…` one. */
  name?: string;
  /** What `mvmctl ls` shows as the VM's command. */
  label?: string[];
};

/** What a command is: the options `vm.exec` takes. */
export type CommandOptions = Pick<ExecOptions, 'env' | 'cwd' | 'createCwd' | 'user' | 'timeout' | 'stdin' | 'tty' | 'signal' | 'onStarted' | 'onWarning'>;

export interface ResolvedVm {
  request: Omit<VmRequest, 'label'>;
  deps: ExecDeps;
}

export interface ResolvedExec {
  request: ExecRequest;
  deps: ExecDeps;
}

/** Checks `options` (cheap checks first, files and templates after) and resolves what to run and boot. */
export async function resolveExec(argv: readonly string[], options: ExecOptions, provider: VmProvider, log: (line: string) => void): Promise<ResolvedExec> {
  const command = resolveCommand(argv, options, { launchPlan: options.launchPlan });
  checkStrings('envFiles', options.envFiles);
  // Loaded on use: the schema library costs a noticeable part of every exec's start-up.
  const plan: LaunchPlan | undefined = options.launchPlan === undefined ? undefined : await (await import('../launchplan/index.js')).loadLaunchPlan(options.launchPlan);
  const fileEnv = await readEnvFiles(options.envFiles ?? [], process.env);
  const vm = await resolveVm(options, provider, log);
  if (plan && options.verbose) for (const field of plan.ignoredFields) log(`launch plan: ignored field ${field}`);
  return {
    request: {
      ...command,
      argv: plan?.argv ?? command.argv,
      // Lowest to highest precedence: the plan's env (app/top-level < entrypoint), the env files, then the options'.
      env: mergeEnv(plan?.env ?? {}, fileEnv, command.env),
      // A plan's working_dir is created when missing, as a container's WORKDIR would be; a cwd given here only when asked.
      cwd: options.cwd ?? plan?.cwd,
      createCwd: options.createCwd ?? (options.cwd === undefined && plan !== undefined),
      ...vm.request,
    },
    deps: vm.deps,
  };
}

/** Checks a command's options (no files read). With `launchPlan`, argv must be empty: the plan supplies it. */
export function resolveCommand(argv: readonly string[], options: CommandOptions, { launchPlan }: { launchPlan?: string } = {}): CommandRequest {
  const tty = resolveTty(options.tty);
  // Programs on a terminal look at TERM to decide what they may send it; docker sets one too.
  const env = { ...(tty ? { TERM: 'xterm' } : {}), ...checkEnv(options.env ?? {}) };
  const timeoutSeconds = integerIn(options.timeout ?? DEFAULT_TIMEOUT_SECONDS, TIMEOUT_SECONDS_RANGE, 'timeout');
  checkCommand(argv, launchPlan);
  if (options.cwd !== undefined) checkGuestString('cwd', options.cwd, { absolute: true });
  return {
    argv: [...argv],
    env,
    ...(options.cwd !== undefined ? { cwd: options.cwd } : {}),
    ...(options.createCwd ? { createCwd: true } : {}),
    ...(options.user !== undefined ? { user: parseUser(options.user, 'user') } : {}),
    timeoutSeconds,
    interactive: options.stdin ?? false,
    ...(tty ? { tty } : {}),
  };
}

/** The size a terminal gets when none is given, as a terminal emulator opens. */
export const DEFAULT_TTY_SIZE = { rows: 24, cols: 80 } as const;

/** A terminal size, checked: whole numbers from 1 to 65535. */
export function ttySize(size: { rows: number; cols: number }, option: string): { rows: number; cols: number } {
  for (const key of ['rows', 'cols'] as const) {
    const v = size?.[key];
    if (!Number.isInteger(v) || v < 1 || v > 0xffff) throw new InvalidOptionError(option, `${key} must be a whole number from 1 to 65535, got ${String(v)}`);
  }
  return { rows: size.rows, cols: size.cols };
}

function resolveTty(tty: CommandOptions['tty']): { rows: number; cols: number } | undefined {
  if (tty === undefined || tty === false) return undefined;
  if (tty === true) return { ...DEFAULT_TTY_SIZE };
  if (typeof tty !== 'object' || tty === null) throw new InvalidOptionError('tty', 'expected true, false or { rows, cols }');
  return ttySize(tty, 'tty');
}

/** Checks a VM's options (cheap checks first, files and templates after) and resolves what to boot. */
export async function resolveVm(options: VmOptions, provider: VmProvider, log: (line: string) => void): Promise<ResolvedVm> {
  const cpus = options.cpus === undefined ? undefined : integerIn(options.cpus, CPUS_RANGE, 'cpus');
  const memoryMiB = options.memory === undefined ? undefined : parseMemory(options.memory, 'memory');
  if (options.name !== undefined) checkVmName(options.name);
  checkChoice('accel', options.accel, ACCEL_CHOICES);
  const backendName = backendChoice(checkChoice('backend', options.backend, BACKEND_CHOICES));
  const addDirParts = (options.addDirs ?? []).map(addDirPartsOf);
  checkStrings('allowHosts', options.allowHosts);
  checkStrings('publish', options.publish);
  checkImageSource(options);

  const addDirs = addDirParts.map((parts) => resolveAddDir(parts, process.cwd()));
  validateAddDirs(addDirs);
  const backend = provider.backend(backendName);
  // A template brings its own default size; sizes given in the options win.
  const template = options.template === undefined ? undefined : await openTemplate(options.template);
  const size = {
    cpus: cpus ?? template?.meta.cpus ?? DEFAULT_CPUS,
    memoryMiB: memoryMiB ?? template?.meta.memoryMiB ?? DEFAULT_MEMORY_MIB,
  };
  const bootTimeoutMs = bootTimeoutFromEnv();
  const accel = accelChoice(options.accel);

  const network = planNetwork({ net: options.net, allowHosts: options.allowHosts, publish: options.publish }, template?.meta.net);
  const snapshotRequest = { ...size, addDirs: addDirs.length, nic: network !== undefined, noSnapshot: options.noSnapshot ?? false };
  const ensureImage = template
    ? async () => templateBootImage(template, backend, snapshotRequest)
    : options.flake !== undefined
      ? (provider.flakeImage ?? flakeBootImage)(options.flake)
      : provider.defaultImage({ backend, request: snapshotRequest, bootTimeoutMs, log });
  return {
    request: { ...size, addDirs, ...(network ? { network } : {}), ...(options.name !== undefined ? { name: options.name } : {}) },
    deps: { backend, ensureImage, bootTimeoutMs, accel },
  };
}

/** One image source at most; a flake reference is parsed now, so a bad one fails before any VM starts. */
function checkImageSource(options: VmOptions): void {
  if (options.flake === undefined) return;
  checkGuestString('flake', options.flake);
  if (options.template !== undefined) throw new InvalidOptionError('flake', 'give flake or template, not both: each says what the VM boots');
  const problem = flakeRefProblem(options.flake);
  if (problem) throw new InvalidOptionError('flake', problem);
}

function checkEnv(env: Readonly<Record<string, string>>): Record<string, string> {
  if (typeof env !== 'object' || env === null || Array.isArray(env)) throw new InvalidOptionError('env', 'expected an object of KEY: value strings');
  for (const [key, value] of Object.entries(env)) {
    if (!isValidEnvKey(key)) throw new InvalidOptionError('env', `variable name ${JSON.stringify(key)} ${ENV_KEY_RULE}`);
    checkGuestString(`env.${key}`, value);
  }
  return { ...env };
}

function checkCommand(argv: readonly string[], launchPlan: string | undefined): void {
  if (!Array.isArray(argv)) throw new InvalidOptionError('argv', 'expected an array of strings, e.g. [\'uname\', \'-a\']');
  if (launchPlan !== undefined) {
    if (argv.length > 0) throw new InvalidOptionError('launchPlan', 'the launch plan supplies the command: give either it or a non-empty argv, not both');
    return;
  }
  if (argv.length === 0) throw new InvalidOptionError('argv', "no command given: pass the command and its arguments, e.g. ['uname', '-a'] (or the launchPlan option)");
  argv.forEach((arg, index) => checkGuestString(`argv[${index}]`, arg));
}

function checkStrings(option: string, values: unknown): void {
  if (values !== undefined && !(Array.isArray(values) && values.every((v) => typeof v === 'string'))) {
    throw new InvalidOptionError(option, 'expected an array of strings');
  }
}

function checkChoice<T extends string>(option: string, value: T | undefined, choices: readonly T[]): T | undefined {
  if (value === undefined || choices.includes(value)) return value;
  throw new InvalidOptionError(option, `'${String(value)}' is not one of ${choices.join(', ')}`);
}

/** An AddDir taken apart; the object form is quoted in messages as the spec it reads as. */
function addDirPartsOf(dir: AddDir): AddDirParts {
  if (typeof dir === 'string') return splitAddDirSpec(dir);
  if (typeof dir !== 'object' || dir === null) throw new InvalidOptionError('addDirs', "expected 'HOST:GUEST[:ro|rw]' strings or { host, guest, mode } objects");
  const { host, guest, mode = 'ro' } = dir;
  if (typeof host !== 'string' || typeof guest !== 'string') throw new InvalidOptionError('addDirs', 'host and guest must be strings');
  if (mode !== 'ro' && mode !== 'rw') throw new InvalidOptionError('addDirs', `mode must be ro or rw, got '${String(mode)}'`);
  return { spec: `${host}:${guest}:${mode}`, host, guest, readOnly: mode === 'ro' };
}
