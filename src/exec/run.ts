import type { Readable, Writable } from 'node:stream';
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { finished } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { driveSerial } from '../backends/drives.js';
import type { Backend, RunningVm, VmSpec } from '../backends/types.js';
import { recoverInterruptedSyncs, stageAddDir, syncBack, type AddDirSpec, type StagedDir } from '../dirsync/index.js';
import { MvmError } from '../errors.js';
import type { Progress } from '../progress.js';
import { AgentConnectionError, EXIT_TIMED_OUT, exitStatusToCode, type AgentSession, type ExecHandle, type ExitStatus } from '../protocol/index.js';
import { listVms } from '../state/registry.js';
import type { Accel, AccelChoice } from '../accel/index.js';
import type { NetworkPlan } from '../net/spec.js';
import { openRunNetwork, type RunNetwork } from './network.js';
import { bootVm, openAgentSession, OwnedVm, planBootAccel, type BootImage, type RestorePlan, type SnapshotChoice } from '../vm/index.js';

export interface ExecRequest {
  argv: string[];
  env: Record<string, string>;
  /** Working directory in the guest; `/` when absent. */
  cwd?: string;
  /** Create `cwd` in the guest when it is missing (launch plans' working_dir). */
  createCwd?: boolean;
  cpus: number;
  memoryMiB: number;
  timeoutSeconds: number;
  /** Forward `io.stdin` to the command; otherwise its stdin is /dev/null. */
  interactive: boolean;
  /** Host directories to mount in the guest, already validated (parseAddDirSpec + validateAddDirs). */
  addDirs: readonly AddDirSpec[];
  /** The guest's NIC and what it may reach (planNetwork); absent: no NIC. */
  network?: NetworkPlan;
}

export interface ExecIo {
  stdin: Readable;
  stdout: Writable;
  stderr: Writable;
  /** Diagnostics for the user (one line each, no trailing newline): warnings, and with -v timings and the console. */
  log: (line: string) => void;
  verbose: boolean;
  progress: Progress;
  /** Called once the agent has started the command: its `signal(signo)` reaches the command's process group. */
  onCommandStarted?: (command: Pick<ExecHandle, 'signal'>) => void;
}

export interface ExecDeps {
  backend: Backend;
  ensureImage: (options: { progress: Progress; signal: AbortSignal }) => Promise<BootImage>;
  /** How long the guest may take from VMM start to the agent's answer. */
  bootTimeoutMs: number;
  accel: AccelChoice;
  /** Replaces GUEST_MARGIN_MS (tests). */
  guestMarginMs?: number;
  /** Replaces HOST_DEADLINE_GRACE_MS (tests). */
  hostDeadlineGraceMs?: number;
}

export interface ExecResult {
  exitCode: number;
  status: ExitStatus;
}

/** Grace the host gives the agent to report its own deadline before it kills the whole VM. */
const HOST_DEADLINE_GRACE_MS = 5_000;
/** How long a powered-off guest may take to end its VMM before it is killed. */
const POWEROFF_WAIT_MS = 5_000;
/**
 * What the guest may add to the boot timeout and --timeout in all (mounts, unmounts, power-off)
 * before the VM is killed: whatever the guest does or fails to do, the run ends.
 */
const GUEST_MARGIN_MS = 120_000;
/** How long a restored guest may take to load and answer HELLO before we give up and boot cold. */
const RESTORE_TIMEOUT_MS = 20_000;

/**
 * Runs one command in a fresh microVM and tears the VM down whatever happens. Aborting `signal`
 * (Ctrl-C, SIGTERM, `mvmctl down`) kills the VM and rejects with the signal's reason.
 */
export async function execInMicroVm(request: ExecRequest, io: ExecIo, deps: ExecDeps, signal: AbortSignal): Promise<ExecResult> {
  const timings = new Timings(io);
  const image = await deps.ensureImage({ progress: io.progress, signal });
  timings.mark('image ready');
  const accel = await planBootAccel(deps.backend, deps.accel, image.kernelSha256, io.log);

  // Listing reaps what runs killed with SIGKILL left behind (state dirs, staging images), and a
  // sync-back such a run left half applied is finished or rolled back.
  await listVms();
  await recoverInterruptedSyncs(io.log);
  const owned = await OwnedVm.create(deps.backend, {
    command: request.argv,
    templateDir: image.template?.dir,
    onVmmStarted: (started) => timings.mark(`VMM started (agent over ${started.agentChannel})`),
  });
  let vm: RunningVm | undefined;
  let session: AgentSession | undefined;
  let network: RunNetwork | undefined;
  // rw directories whose guest changes have not been brought back (yet): reported as discarded if the run ends early.
  const pendingSync = new Set<StagedDir>();
  const guestLimitMs = deps.bootTimeoutMs + request.timeoutSeconds * 1000 + (deps.guestMarginMs ?? GUEST_MARGIN_MS);
  const guestDeadline = new AbortController();
  let guestTimer: NodeJS.Timeout | undefined;
  try {
    if (request.network) network = await openRunNetwork(request.network, owned.runDir, deps.backend, io);
    const staged: StagedDir[] = [];
    for (const spec of request.addDirs) {
      staged.push(await stageAddDir(spec, owned.runDir, { progress: io.progress, signal }));
    }
    if (staged.length > 0) timings.mark('directories staged');

    const spec: Omit<VmSpec, 'accel' | 'name' | 'runDir'> = {
      kernel: image.kernel,
      initrd: image.initrd,
      kernelArgs: network ? [...image.kernelArgs, network.kernelArg] : image.kernelArgs,
      cpus: request.cpus,
      memoryMiB: request.memoryMiB,
      drives: staged.map((dir) => ({ path: dir.imagePath, readOnly: dir.readOnly })),
      ...(image.rootDrive ? { rootDrive: image.rootDrive } : {}),
      ...(network ? { nic: network.nic } : {}),
      onConsoleLine: io.verbose ? (line) => io.log(`[console] ${line}`) : undefined,
    };

    guestTimer = setTimeout(() => {
      const seconds = Number((guestLimitMs / 1000).toFixed(1));
      guestDeadline.abort(new MvmError(`the guest did not finish within ${seconds} s (boot timeout + --timeout + a margin); the VM was killed`, EXIT_TIMED_OUT));
    }, guestLimitMs);
    // From here on the guest is running: everything it could stall ends with the deadline too.
    const guestSignal = AbortSignal.any([signal, guestDeadline.signal]);
    // A request in flight (MOUNT, UNMOUNT…) ends at once, not at its own deadline.
    guestSignal.addEventListener('abort', () => session?.close(), { once: true });
    const choice: SnapshotChoice = image.chooseSnapshot ? await image.chooseSnapshot(accel, guestSignal) : {};
    if (choice.warning) io.log(choice.warning);
    else if (choice.note && io.verbose) io.log(choice.note);
    const snapshot = choice.plan && (await fitDriveSlots(choice.plan, staged, deps.backend, io));
    if (snapshot) {
      const restore = await restoreSnapshot(owned, { ...spec, accel: accel.accel }, snapshot, guestSignal);
      if ('session' in restore) {
        ({ vm, session } = restore);
        timings.mark(`restored from snapshot, agent ready (${session.agentVersion})`);
      } else {
        io.log(`${image.label ? `${image.label}: ` : ''}restoring the snapshot failed (${restore.error}); booting cold instead`);
        timings.mark('snapshot restore failed');
      }
    }
    if (!session || !vm) {
      const booted = await bootVm(owned, spec, {
        accel,
        signal: guestSignal,
        timeoutMs: deps.bootTimeoutMs,
        guest: 'the guest',
        timeoutHint: 'raise MVM_BOOT_TIMEOUT if the host is very slow',
        log: io.log,
      });
      ({ vm, session } = booted);
      timings.mark(`agent ready (${session.agentVersion}, ${accelName(booted.accel)})`);
    }

    for (const [index, dir] of staged.entries()) {
      await session.mount(`serial:${driveSerial(index)}`, dir.spec.guestPath, 'ext4', dir.readOnly).catch((error: Error) => {
        throw new MvmError(`--add-dir ${dir.spec.spec}: the guest could not mount it: ${error.message}`);
      });
      if (!dir.readOnly) pendingSync.add(dir);
    }

    const status = await runCommand(session, vm, { ...request, env: { ...network?.env, ...request.env } }, io, guestSignal, deps.hostDeadlineGraceMs ?? HOST_DEADLINE_GRACE_MS);
    timings.mark('command finished');

    // A timed-out command's directories are not synced: its writes may be half done.
    const toSync = status.kind === 'timedOut' ? [] : await unmountForSync([...pendingSync], session, io);
    // A guest past its deadline gets no chance to power off: it is killed below.
    if (!guestSignal.aborted) await powerOff(session, vm);
    // The images are read only once the VMM has exited and been reaped: a guest that answered
    // POWEROFF and kept running could otherwise rewrite its disk under the host's checks.
    await vm.kill();
    clearTimeout(guestTimer);
    guestDeadline.signal.throwIfAborted();
    timings.mark('VM stopped');

    for (const dir of toSync) {
      // syncBack's own error says what happened to HOST; no second "discarded" line for this dir.
      pendingSync.delete(dir);
      const report = await syncBack(dir, { progress: io.progress, warn: io.log, signal });
      if (io.verbose) io.log(`--add-dir ${dir.spec.spec}: synced back ${report.filesWritten} files, deleted ${report.deleted}`);
    }
    if (toSync.length > 0) timings.mark('directories synced back');
    return { exitCode: exitStatusToCode(status), status };
  } catch (error) {
    // Whatever broke because of an abort (a closed session, a killed VM) is reported as the abort.
    if (signal.aborted) throw signal.reason;
    if (guestDeadline.signal.aborted) throw guestDeadline.signal.reason;
    throw error;
  } finally {
    clearTimeout(guestTimer);
    await owned.release();
    await network?.close();
    for (const dir of pendingSync) io.log(`--add-dir ${dir.spec.spec}: guest changes discarded, ${dir.spec.hostPath} left as it was`);
  }
}

function accelName(accel: Accel): string {
  return accel === 'kvm' ? 'KVM' : 'TCG';
}

/**
 * Makes the staged `--add-dir` images fit the snapshot's drive slots: each is extended (sparse) to
 * the slot's size, which the restored guest already knows its device to have; its file system
 * stays as built. An image bigger than a slot means a cold boot, noted with -v.
 */
async function fitDriveSlots(plan: RestorePlan, staged: readonly StagedDir[], backend: Backend, io: ExecIo): Promise<RestorePlan | undefined> {
  const readOnly = staged.find((dir) => dir.readOnly);
  if (readOnly && !backend.capabilities().restoredDrivesReadOnly) {
    if (io.verbose) io.log(`snapshot not used: the ${backend.name} backend cannot attach --add-dir ${readOnly.spec.spec} read-only to a restored VM`);
    return undefined;
  }
  const tooBig = staged.find((dir) => dir.imageBytes > plan.driveSlots.slotBytes);
  if (tooBig) {
    if (io.verbose) io.log(`snapshot not used: the image of --add-dir ${tooBig.spec.spec} is larger than a drive slot (${plan.driveSlots.slotBytes / 1024 ** 3} GiB)`);
    return undefined;
  }
  for (const dir of staged) await truncate(dir.imagePath, plan.driveSlots.slotBytes);
  return plan;
}

/**
 * Restores a snapshot into a new VMM and opens a fresh agent session on it (its HELLO sets the guest
 * clock and reseeds the guest RNG). Any failure kills that VMM and is returned, not thrown, so the
 * caller can boot cold; only an abort (Ctrl-C) is thrown.
 */
async function restoreSnapshot(
  owned: OwnedVm,
  cold: Omit<VmSpec, 'name' | 'runDir'>,
  plan: RestorePlan,
  signal: AbortSignal,
): Promise<{ vm: RunningVm; session: AgentSession } | { error: string }> {
  let vm: RunningVm | undefined;
  const attempt = AbortSignal.any([signal, AbortSignal.timeout(RESTORE_TIMEOUT_MS)]);
  try {
    // The staged directories take their slots; the rest get empty files of this VM's own, so that
    // no guest can write to a file other restores of the snapshot also attach (a backend may not
    // be able to attach them read-only).
    const drives = await Promise.all(
      plan.driveSlots.paths.map(async (_, index) => cold.drives[index] ?? { path: await emptySlot(owned.runDir, index, plan.driveSlots.slotBytes), readOnly: true }),
    );
    vm = await owned.start(
      {
        ...cold,
        drives,
        snapshot: { mode: 'restore', dir: plan.dir },
        ...(plan.rootDrive ? { rootDrive: plan.rootDrive } : {}),
      },
      attempt,
    );
    const session = await openAgentSession(vm, { signal: attempt, timeoutMs: RESTORE_TIMEOUT_MS, guest: 'the restored guest' });
    return { vm, session };
  } catch (error) {
    await vm?.kill();
    if (signal.aborted) throw signal.reason;
    if (attempt.aborted) return { error: `the restore took longer than ${RESTORE_TIMEOUT_MS / 1000} s` };
    return { error: (error instanceof Error ? error.message : String(error)).replace(/\s*\n\s*/g, ' ') };
  }
}

async function emptySlot(runDir: string, index: number, bytes: number): Promise<string> {
  const path = join(runDir, `empty-slot${index}`);
  await writeFile(path, '');
  await truncate(path, bytes);
  return path;
}

/**
 * Unmounts rw directories in the guest so their images are complete and clean; one that fails to
 * unmount is not synced back (its image may be inconsistent).
 */
async function unmountForSync(dirs: StagedDir[], session: AgentSession, io: ExecIo): Promise<StagedDir[]> {
  const clean: StagedDir[] = [];
  for (const dir of dirs) {
    try {
      await session.unmount(dir.spec.guestPath);
      clean.push(dir);
    } catch (error) {
      io.log(`--add-dir ${dir.spec.spec}: the guest could not unmount it cleanly (${(error as Error).message})`);
    }
  }
  return clean;
}

async function runCommand(session: AgentSession, vm: RunningVm, request: ExecRequest, io: ExecIo, signal: AbortSignal, graceMs: number): Promise<ExitStatus> {
  const handle = await session.exec({
    argv: request.argv,
    env: request.env,
    cwd: request.cwd,
    mkdirCwd: request.createCwd,
    timeoutMs: request.timeoutSeconds * 1000,
    stdin: request.interactive,
    signal,
  });
  io.onCommandStarted?.(handle);
  handle.stdout.pipe(io.stdout, { end: false });
  handle.stderr.pipe(io.stderr, { end: false });
  if (handle.stdin) io.stdin.pipe(handle.stdin);

  let hostDeadline: NodeJS.Timeout | undefined;
  let vmKilledByHost = false;
  const deadlinePassed = new Promise<ExitStatus>((resolve) => {
    hostDeadline = setTimeout(() => {
      vmKilledByHost = true;
      void vm.kill();
      resolve({ kind: 'timedOut', code: 9, message: 'the guest missed its deadline; the VM was killed' });
    }, request.timeoutSeconds * 1000 + graceMs);
  });
  const vmDied = vm.failed.then((failure): never => {
    const why = failure.reason.startsWith('the VMM exited') ? 'guest crash?' : failure.reason;
    throw new MvmError(`the VM stopped before the command finished (${why})`, 125, vm.consoleTail(20));
  });
  try {
    const status = await Promise.race([
      handle.exit.catch(async (error: unknown) => {
        if (!(error instanceof AgentConnectionError) || signal.aborted) throw error;
        // The agent's end of the connection went first; the VM's end (a crash, the guest's init
        // ending the VM when its agent died) follows within moments and says more.
        await Promise.race([vmDied, sleep(1_000, undefined, { ref: false })]);
        throw new MvmError(`the guest agent went away before the command finished (${error.message})`, 125, vm.consoleTail(20));
      }),
      deadlinePassed,
      vmDied,
    ]);
    // Output written before EXIT is still on its way to io.stdout/io.stderr; only a VM the host had
    // to kill leaves streams that will never end.
    if (!vmKilledByHost) await Promise.all([finished(handle.stdout), finished(handle.stderr)]);
    if (status.kind === 'spawnFailed') io.log(status.message);
    if (status.kind === 'timedOut') io.log(`command timed out after ${request.timeoutSeconds} s`);
    return status;
  } finally {
    clearTimeout(hostDeadline);
    vmDied.catch(() => {});
    if (handle.stdin) io.stdin.unpipe(handle.stdin);
  }
}

/**
 * Asks the agent to power off only after EXIT has arrived: virtio-serial drops data the guest wrote
 * just before it stops (shared notes, pitfall 4). A guest that does not stop in time is killed.
 */
async function powerOff(session: AgentSession, vm: RunningVm): Promise<void> {
  try {
    await Promise.race([session.poweroff(), sleep(POWEROFF_WAIT_MS, undefined, { ref: false })]);
  } catch {
    // The VM is killed below anyway; a failed power-off request changes nothing for the user.
  }
  session.close();
  const ended = await Promise.race([vm.exited.then(() => true), sleep(POWEROFF_WAIT_MS, false, { ref: false })]);
  if (!ended) await vm.requestShutdown?.();
}

class Timings {
  private readonly start = performance.now();
  private last = this.start;

  constructor(private readonly io: ExecIo) {}

  mark(what: string): void {
    if (!this.io.verbose) return;
    const now = performance.now();
    this.io.log(`[timing] ${what}: +${((now - this.last) / 1000).toFixed(3)} s (${((now - this.start) / 1000).toFixed(3)} s total)`);
    this.last = now;
  }
}
