/**
 * The guest kernel: built once from Debian's linux-source-6.1 with `make tinyconfig` plus the
 * fragment kernel/guest.config, kept as the uncompressed ELF `vmlinux` (QEMU boots it through its
 * PVH note; Firecracker wants exactly this form). Cached by the hash of the fragment and the source
 * tarball's identity at `<cacheDir>/kernels/<key>/vmlinux`; built in a temporary directory and
 * renamed into place, so an interrupted or concurrent build never leaves a half-written kernel.
 */
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { access, copyFile, mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';

import { MvmError } from '../errors.js';
import { runTool } from '../run-tool.js';
import { findExecutable } from '../which.js';
import { type Progress, silentProgress } from '../progress.js';
import { pidAlive, withLock } from './lock.js';
import { KERNEL_FRAGMENT_PATH, KERNEL_SOURCE_TARBALL } from './repo.js';

/** Bump when the build recipe changes in a way that changes the result (it is part of the key). */
export const KERNEL_RECIPE_VERSION = 1;

/** Roughly how many files `make vmlinux` compiles for this config (for the progress line only). */
const EXPECTED_COMPILED_FILES = 1200;

// ---------------------------------------------------------------------------------------------
// Kconfig fragments and their verification (pure, unit-tested)

/** `CONFIG_X=value` lines as a map; `# CONFIG_X is not set` and `CONFIG_X=n` map to `n`. */
export function parseKconfig(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    const unset = /^# (CONFIG_[A-Za-z0-9_]+) is not set$/.exec(line);
    if (unset) {
      out.set(unset[1]!, 'n');
      continue;
    }
    if (line === '' || line.startsWith('#')) continue;
    const set = /^(CONFIG_[A-Za-z0-9_]+)=(.*)$/.exec(line);
    if (set) out.set(set[1]!, set[2]!);
  }
  return out;
}

export interface ConfigMismatch {
  option: string;
  wanted: string;
  /** What the final .config has; `n` when absent or not set. */
  got: string;
}

/** Options of `fragment` that `config` (a final .config) does not have as asked. */
export function verifyKconfig(fragment: string, config: string): ConfigMismatch[] {
  const want = parseKconfig(fragment);
  const have = parseKconfig(config);
  const mismatches: ConfigMismatch[] = [];
  for (const [option, wanted] of want) {
    const got = have.get(option) ?? 'n';
    if (got !== wanted) mismatches.push({ option, wanted, got });
  }
  return mismatches;
}

export function describeMismatches(mismatches: readonly ConfigMismatch[]): string {
  return mismatches.map((m) => `${m.option} (wanted ${m.wanted === 'n' ? 'not set' : m.wanted}, got ${m.got === 'n' ? 'not set' : m.got})`).join(', ');
}

// ---------------------------------------------------------------------------------------------
// Cache key

export interface SourceIdentity {
  path: string;
  size: number;
  /** sha256 of the first MiB: cheap, and survives `touch` and copies. */
  headSha256: string;
}

export async function sourceIdentity(path: string): Promise<SourceIdentity> {
  const handle = await open(path, 'r');
  try {
    const { size } = await handle.stat();
    const buf = Buffer.alloc(Math.min(size, 1 << 20));
    const { bytesRead } = await handle.read(buf, 0, buf.length, 0);
    return { path, size, headSha256: createHash('sha256').update(buf.subarray(0, bytesRead)).digest('hex') };
  } finally {
    await handle.close();
  }
}

/** The cache key of the kernel built from `fragment` and that source tarball. */
export function kernelCacheKey(fragment: string, source: Pick<SourceIdentity, 'size' | 'headSha256'>): string {
  return createHash('sha256')
    .update(`mvm-kernel recipe ${KERNEL_RECIPE_VERSION}\n`)
    .update(`source size ${source.size} head ${source.headSha256}\n`)
    .update(fragment)
    .digest('hex');
}

export function kernelsDir(cacheRoot: string): string {
  return join(cacheRoot, 'kernels');
}

// ---------------------------------------------------------------------------------------------
// Build prerequisites

/** Host tools the build runs, and the Debian package that provides each. */
export const BUILD_TOOLS: ReadonlyArray<readonly [tool: string, pkg: string]> = [
  ['make', 'make (or build-essential)'],
  ['gcc', 'gcc (or build-essential)'],
  ['ld', 'binutils (or build-essential)'],
  ['tar', 'tar'],
  ['xz', 'xz-utils'],
  ['flex', 'flex'],
  ['bison', 'bison'],
  ['bc', 'bc'],
  ['awk', 'mawk'],
  ['perl', 'perl'],
];

/** Throws an MvmError naming the Debian packages to install when something the build needs is missing. */
export async function checkKernelBuildPrerequisites(sourceTarball: string): Promise<void> {
  const hint = 'or set MVM_KERNEL=/path/to/vmlinux to use a kernel you built';
  try {
    await access(sourceTarball, fsConstants.R_OK);
  } catch {
    throw new MvmError(
      `the guest kernel is built from ${sourceTarball}, which is missing: install the Debian package linux-source-6.1 (apt-get install linux-source-6.1), ${hint}`,
    );
  }
  const missing: string[] = [];
  for (const [tool, pkg] of BUILD_TOOLS) if (!findExecutable(tool)) missing.push(`${tool} (${pkg})`);
  const libelf = await access('/usr/include/libelf.h').then(() => true, () => false);
  if (!libelf) missing.push('libelf.h (libelf-dev)');
  if (missing.length > 0) {
    throw new MvmError(`building the guest kernel needs tools that are missing: ${missing.join(', ')}; install those Debian packages, ${hint}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Running the build

/** A kernel build step (make of the whole kernel on a slow host included) that runs longer is stuck. */
const BUILD_STEP_TIMEOUT_MS = 3 * 3600_000;

interface RunResult {
  tail: string[];
}

/** Runs a build step, feeding each output line to `onLine`; rejects with the output's tail on failure. */
async function runCommand(
  command: string,
  args: string[],
  options: { cwd: string; env?: NodeJS.ProcessEnv; signal?: AbortSignal; onLine?: (line: string) => void; what: string },
): Promise<RunResult> {
  const tail: string[] = [];
  const result = await runTool(command, args, {
    cwd: options.cwd,
    env: options.env ?? process.env,
    signal: options.signal,
    // make passes SIGTERM on to the compilers it started.
    abortSignal: 'SIGTERM',
    timeoutMs: BUILD_STEP_TIMEOUT_MS,
    onLine: (line) => {
      tail.push(line);
      if (tail.length > 40) tail.shift();
      options.onLine?.(line);
    },
  }).catch((err: Error) => {
    if (options.signal?.aborted) throw new MvmError(`${options.what}: interrupted`, 130);
    throw new MvmError(`${options.what}: ${err.message}`);
  });
  if (result.code !== 0) throw new MvmError(`${options.what} failed (exit status ${result.code})`, 125, tail.slice(-25));
  return { tail };
}

function formatDuration(ms: number): string {
  const s = Math.round(ms / 1000);
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
}

/** Deletes build directories left behind by mvmctl processes that no longer exist. */
async function removeStaleBuilds(dir: string): Promise<void> {
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const name of names) {
    const m = /^\.build-[0-9a-f]+-(\d+)$/.exec(name);
    if (m && !pidAlive(Number(m[1]))) await rm(join(dir, name), { recursive: true, force: true });
  }
}

export interface BuiltKernel {
  /** The uncompressed ELF kernel. */
  vmlinux: string;
  /** Cache key (sha256 of the recipe, the fragment and the source identity). */
  key: string;
  /** True when this call compiled it. */
  built: boolean;
}

export interface KernelBuildOptions {
  cacheRoot: string;
  fragmentPath?: string;
  sourceTarball?: string;
  progress?: Progress;
  signal?: AbortSignal;
  /** Parallel jobs for make (default: the CPUs available). */
  jobs?: number;
}

/** Metadata written next to a cached vmlinux. */
export interface KernelBuildInfo {
  key: string;
  recipeVersion: number;
  fragmentSha256: string;
  source: SourceIdentity;
  builtAt: string;
  buildSeconds: number;
  release?: string;
}

async function readFragment(fragmentPath: string): Promise<string> {
  return readFile(fragmentPath, 'utf8').catch((err: Error) => {
    throw new MvmError(`cannot read the guest kernel config fragment ${fragmentPath}: ${err.message}`);
  });
}

/**
 * The cached kernel for the current fragment and source, or undefined when it would have to be built.
 * When the source tarball is gone but a kernel built from the same fragment is cached, that one is used.
 */
export async function cachedKernel(options: Pick<KernelBuildOptions, 'cacheRoot' | 'fragmentPath' | 'sourceTarball'>): Promise<BuiltKernel | undefined> {
  const fragment = await readFragment(options.fragmentPath ?? KERNEL_FRAGMENT_PATH);
  const root = kernelsDir(options.cacheRoot);
  const source = await sourceIdentity(options.sourceTarball ?? KERNEL_SOURCE_TARBALL).catch(() => undefined);
  if (!source) return findCachedKernelForFragment(root, fragment);
  const key = kernelCacheKey(fragment, source);
  const vmlinux = join(root, key, 'vmlinux');
  return (await isFile(vmlinux)) ? { vmlinux, key, built: false } : undefined;
}

/** The cached kernel for the current fragment and source, building it first if needed (minutes). */
export async function ensureKernel(options: KernelBuildOptions): Promise<BuiltKernel> {
  const cached = await cachedKernel(options);
  if (cached) return cached;
  const progress = options.progress ?? silentProgress;
  const fragmentPath = options.fragmentPath ?? KERNEL_FRAGMENT_PATH;
  const sourceTarball = options.sourceTarball ?? KERNEL_SOURCE_TARBALL;
  await checkKernelBuildPrerequisites(sourceTarball); // a clear message naming the Debian package
  const fragment = await readFragment(fragmentPath);
  const source = await sourceIdentity(sourceTarball);
  const key = kernelCacheKey(fragment, source);
  const root = kernelsDir(options.cacheRoot);
  const vmlinux = join(root, key, 'vmlinux');
  await mkdir(root, { recursive: true });
  return withLock(
    join(root, `${key}.lock`),
    async () => {
      if (await isFile(vmlinux)) return { vmlinux, key, built: false }; // another process built it meanwhile
      await removeStaleBuilds(root);
      await buildKernelInto({ root, key, fragment, fragmentPath, source, progress, signal: options.signal, jobs: options.jobs });
      return { vmlinux, key, built: true };
    },
    { signal: options.signal, progress, what: 'building the guest kernel' },
  );
}

async function isFile(path: string): Promise<boolean> {
  return stat(path).then((s) => s.isFile(), () => false);
}

async function findCachedKernelForFragment(root: string, fragment: string): Promise<BuiltKernel | undefined> {
  const fragmentSha256 = createHash('sha256').update(fragment).digest('hex');
  let best: { kernel: BuiltKernel; at: string } | undefined;
  for (const name of await readdir(root).catch(() => [] as string[])) {
    if (!/^[0-9a-f]{64}$/.test(name)) continue;
    try {
      const info = JSON.parse(await readFile(join(root, name, 'kernel.json'), 'utf8')) as KernelBuildInfo;
      const vmlinux = join(root, name, 'vmlinux');
      if (info.fragmentSha256 !== fragmentSha256 || info.recipeVersion !== KERNEL_RECIPE_VERSION || !(await isFile(vmlinux))) continue;
      if (!best || info.builtAt > best.at) best = { kernel: { vmlinux, key: name, built: false }, at: info.builtAt };
    } catch {
      // not a finished kernel
    }
  }
  return best?.kernel;
}

async function buildKernelInto(args: {
  root: string;
  key: string;
  fragment: string;
  fragmentPath: string;
  source: SourceIdentity;
  progress: Progress;
  signal?: AbortSignal;
  jobs?: number;
}): Promise<void> {
  const { root, key, progress, signal } = args;
  const started = Date.now();
  const work = join(root, `.build-${key.slice(0, 16)}-${process.pid}`);
  await rm(work, { recursive: true, force: true });
  await mkdir(join(work, 'out'), { recursive: true });
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    LC_ALL: 'C',
    KBUILD_BUILD_TIMESTAMP: '1970-01-01 00:00:00 UTC',
    KBUILD_BUILD_USER: 'mvm',
    KBUILD_BUILD_HOST: 'mvm',
  };
  // Output goes to a pipe: never let make or merge_config wait on a terminal.
  delete env.MAKEFLAGS;
  delete env.MFLAGS;
  try {
    progress(`guest kernel: not built yet, building it from ${args.source.path} (10 to 20 minutes on 2 CPUs; done once)`);
    progress('guest kernel: extracting the source');
    await runCommand('tar', ['-xJf', args.source.path, '-C', work], { cwd: work, env, signal, what: 'extracting the kernel source' });
    const dirs = (await readdir(work, { withFileTypes: true })).filter((d) => d.isDirectory() && d.name !== 'out');
    if (dirs.length !== 1) throw new MvmError(`unexpected layout of ${args.source.path}: ${dirs.map((d) => d.name).join(', ')}`);
    const src = join(work, dirs[0]!.name);

    progress('guest kernel: configuring (tinyconfig + kernel/guest.config)');
    const fragmentCopy = join(work, 'guest.config');
    await writeFile(fragmentCopy, args.fragment);
    await runCommand('make', ['tinyconfig'], { cwd: src, env, signal, what: 'make tinyconfig' });
    await runCommand('sh', ['scripts/kconfig/merge_config.sh', '-m', '.config', fragmentCopy], { cwd: src, env, signal, what: 'merging kernel/guest.config' });
    await runCommand('make', ['olddefconfig'], { cwd: src, env, signal, what: 'make olddefconfig' });
    const config = await readFile(join(src, '.config'), 'utf8');
    const mismatches = verifyKconfig(args.fragment, config);
    if (mismatches.length > 0) {
      throw new MvmError(
        `the guest kernel config did not take these options from ${args.fragmentPath} (a dependency is missing or the option does not exist in this kernel): ${describeMismatches(mismatches)}`,
      );
    }

    const jobs = args.jobs ?? availableParallelism();
    progress(`guest kernel: compiling vmlinux (make -j${jobs})`);
    let compiled = 0;
    let lastReport = Date.now();
    await runCommand('make', [`-j${jobs}`, 'vmlinux'], {
      cwd: src,
      env,
      signal,
      what: 'compiling the guest kernel',
      onLine: (line) => {
        if (/^\s+(CC|AS)\s/.test(line)) compiled++;
        const now = Date.now();
        if (now - lastReport >= 10_000) {
          lastReport = now;
          progress(`guest kernel: compiling, ${compiled} of ~${Math.max(compiled, EXPECTED_COMPILED_FILES)} files (${formatDuration(now - started)})`);
        }
      },
    });
    const release = (await readFile(join(src, 'include/config/kernel.release'), 'utf8').catch(() => '')).trim() || undefined;

    const out = join(work, 'out');
    await copyFile(join(src, 'vmlinux'), join(out, 'vmlinux'));
    await writeFile(join(out, 'config'), config);
    const info: KernelBuildInfo = {
      key,
      recipeVersion: KERNEL_RECIPE_VERSION,
      fragmentSha256: createHash('sha256').update(args.fragment).digest('hex'),
      source: args.source,
      builtAt: new Date().toISOString(),
      buildSeconds: Math.round((Date.now() - started) / 100) / 10,
      ...(release ? { release } : {}),
    };
    await writeFile(join(out, 'kernel.json'), JSON.stringify(info, null, 2) + '\n');
    try {
      await rename(out, join(root, key));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'EEXIST' && code !== 'ENOTEMPTY') throw err; // someone else finished first: theirs is identical
    }
    progress(`guest kernel: built ${release ?? ''} in ${formatDuration(Date.now() - started)}`.replace('  ', ' '));
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** Reads the kernel.json written beside a cached vmlinux (undefined for a user's kernel). */
export async function readKernelBuildInfo(vmlinux: string): Promise<KernelBuildInfo | undefined> {
  try {
    return JSON.parse(await readFile(join(vmlinux, '..', 'kernel.json'), 'utf8')) as KernelBuildInfo;
  } catch {
    return undefined;
  }
}
