/**
 * A microVM from boot to teardown, in the order every run follows: the image, the VM's directory
 * and record, its network, its `--add-dir` images, a restore or a cold boot, the mounts; then any
 * number of commands, one at a time; then the stop (unmount, power off, VMM reaped, sync-back) and
 * the release (whatever is left killed and removed). `exec` is one command between start and stop;
 * a long-lived VM (`LiveVm.start`, `mvmctl up`) runs many.
 */
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Accel, AccelChoice } from '../accel/index.js';
import { driveSerial } from '../backends/drives.js';
import type { Backend, RunningVm, VmSpec } from '../backends/types.js';
import { recoverInterruptedSyncs, stageAddDir, syncBack, type AddDirSpec, type StagedDir } from '../dirsync/index.js';
import { MvmError } from '../errors.js';
import type { NetworkPlan } from '../net/spec.js';
import type { Progress } from '../progress.js';
import { EXIT_TIMED_OUT, type AgentSession, type ExitStatus } from '../protocol/index.js';
import { listVms } from '../state/registry.js';
import { bootVm, openAgentSession, OwnedVm, planBootAccel, type BootImage, type RestorePlan, type SnapshotChoice } from '../vm/index.js';
import { runCommand, type CommandIo, type CommandRequest } from './command.js';
import { openRunNetwork, type RunNetwork } from './network.js';

export interface VmRequest {
  cpus: number;
  memoryMiB: number;
  /** Host directories to mount in the guest, already validated (parseAddDirSpec + validateAddDirs). */
  addDirs: readonly AddDirSpec[];
  /** The guest's NIC and what it may reach (planNetwork); absent: no NIC. */
  network?: NetworkPlan;
  /** What `ls` shows as the VM's command. */
  label: string[];
  /** The VM's name (checkVmName); default: a generated one. */
  name?: string;
}

export interface VmIo {
  /** Diagnostics for the user (one line each, no trailing newline): warnings, and with -v timings and the console. */
  log: (line: string) => void;
  verbose: boolean;
  progress: Progress;
}

export interface VmDeps {
  backend: Backend;
  ensureImage: (options: { progress: Progress; signal: AbortSignal }) => Promise<BootImage>;
  /** How long the guest may take from VMM start to the agent's answer. */
  bootTimeoutMs: number;
  accel: AccelChoice;
  /** Replaces the grace a command's guest gets past its deadline before its VM is killed (tests). */
  hostDeadlineGraceMs?: number;
  /** Replaces how long a restored guest may take to answer before the run boots cold (tests). */
  restoreTimeoutMs?: number;
}

export interface StartOptions {
  /**
   * The most the guest may take from its boot to its stop, all in: past it the VM is killed and the
   * run fails with exit 124. Absent: no limit beyond each request's and command's own.
   */
  guestLimitMs?: number;
}

/** How long a restored guest may take to load and answer HELLO before we give up and boot cold. */
const RESTORE_TIMEOUT_MS = 20_000;

export class LiveVm {
  /** rw directories whose guest changes have not been brought back (yet): reported as discarded if the VM ends first. */
  private readonly pendingSync = new Set<StagedDir>();
  private busy = false;
  private released?: Promise<void>;

  private constructor(
    private readonly owned: OwnedVm,
    private readonly network: RunNetwork | undefined,
    private readonly vm: RunningVm,
    private readonly session: AgentSession,
    staged: readonly StagedDir[],
    private readonly io: VmIo,
    private readonly timings: Timings,
    /** The caller's signal (Ctrl-C, `down`): it also stops a sync-back. */
    private readonly signal: AbortSignal,
    private readonly guestDeadline: GuestDeadline,
    private readonly hostDeadlineGraceMs: number | undefined,
  ) {
    for (const dir of staged) if (!dir.readOnly) this.pendingSync.add(dir);
  }

  get name(): string {
    return this.owned.name;
  }

  /** The VM's private directory (its sockets live there). */
  get runDir(): string {
    return this.owned.runDir;
  }

  /** Settles when the VM can run no more commands: its VMM exited, or the guest failed. */
  get failed(): Promise<unknown> {
    return this.vm.failed;
  }

  /**
   * Boots (or restores) the VM and mounts its directories. Aborting `signal` kills it and rejects
   * with the signal's reason; a failure releases everything it made before it throws.
   */
  static async start(request: VmRequest, io: VmIo, deps: VmDeps, signal: AbortSignal, options: StartOptions = {}): Promise<LiveVm> {
    const timings = new Timings(io);
    const image = await deps.ensureImage({ progress: io.progress, signal });
    timings.mark('image ready');
    const accel = await planBootAccel(deps.backend, deps.accel, image.kernelSha256, io.log);

    // Listing reaps what runs killed with SIGKILL left behind (state dirs, staging images), and a
    // sync-back such a run left half applied is finished or rolled back.
    await listVms();
    await recoverInterruptedSyncs(io.log);
    const owned = await OwnedVm.create(deps.backend, {
      command: request.label,
      templateDir: image.template?.dir,
      ...(request.name ? { name: request.name } : {}),
      onVmmStarted: (started) => timings.mark(`VMM started (agent over ${started.agentChannel})`),
    });
    const guestDeadline = new GuestDeadline(signal);
    let network: RunNetwork | undefined;
    let vm: RunningVm | undefined;
    let session: AgentSession | undefined;
    const staged: StagedDir[] = [];
    try {
      if (request.network) network = await openRunNetwork(request.network, owned.runDir, deps.backend, io);
      else if (io.verbose) io.log('[net] none (no NIC)');
      for (const spec of request.addDirs) staged.push(await stageAddDir(spec, owned.runDir, { progress: io.progress, signal }));
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

      // From here on the guest is running: everything it could stall ends with the deadline too.
      if (options.guestLimitMs !== undefined) guestDeadline.arm(options.guestLimitMs);
      const guestSignal = guestDeadline.signal;
      // A request in flight (MOUNT, UNMOUNT…) ends at once, not at its own deadline.
      guestSignal.addEventListener('abort', () => session?.close(), { once: true });
      const choice: SnapshotChoice = image.chooseSnapshot ? await image.chooseSnapshot(accel, guestSignal) : {};
      if (choice.warning) io.log(choice.warning);
      else if (choice.note && io.verbose) io.log(choice.note);
      const snapshot = choice.plan && (await fitDriveSlots(choice.plan, staged, deps.backend, io));
      // What the VM's start adds from here on is the bench's "VMM start -> agent ready".
      timings.mark('host prepared, starting the VMM');
      if (snapshot) {
        const restore = await restoreSnapshot(owned, { ...spec, accel: accel.accel }, snapshot, guestSignal, deps.restoreTimeoutMs ?? RESTORE_TIMEOUT_MS);
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
      }
      return new LiveVm(owned, network, vm, session, staged, io, timings, signal, guestDeadline, deps.hostDeadlineGraceMs);
    } catch (error) {
      guestDeadline.disarm();
      await owned.release();
      await network?.close();
      throw guestDeadline.explain(error);
    }
  }

  /** Runs one command; commands run one at a time (the agent runs one at a time). */
  async run(request: CommandRequest, io: CommandIo, signal?: AbortSignal): Promise<ExitStatus> {
    if (this.busy) throw new MvmError(`a command is already running in ${this.name}`);
    this.busy = true;
    try {
      const guestSignal = signal ? AbortSignal.any([this.guestDeadline.signal, signal]) : this.guestDeadline.signal;
      // The proxy's variables are under the command's own: an -e HTTP_PROXY wins.
      const withNetworkEnv = { ...request, env: { ...this.network?.env, ...request.env } };
      const status = await runCommand(this.session, this.vm, withNetworkEnv, io, guestSignal, this.hostDeadlineGraceMs);
      this.timings.mark('command finished');
      return status;
    } catch (error) {
      throw this.guestDeadline.explain(error);
    } finally {
      this.busy = false;
    }
  }

  /**
   * Stops the VM: with `sync`, unmounts the rw directories and, once the VMM has been killed and
   * reaped (a guest that answered UNMOUNT and kept writing could otherwise rewrite its disk under
   * the host's checks), brings their changes back to HOST. Without, the changes are discarded.
   *
   * The guest is not powered off first: every disk it could still write is a throwaway layer or an
   * image already unmounted, and all its output came before EXIT, so a clean guest shutdown would
   * keep nothing a kill loses, and costs a guest reboot under emulation on every run.
   */
  async stop({ sync }: { sync: boolean }): Promise<void> {
    try {
      const toSync = sync ? await this.unmountForSync() : [];
      this.session.close();
      await this.vm.kill();
      this.guestDeadline.disarm();
      this.guestDeadline.throwIfPassed();
      this.timings.mark('VM stopped');

      for (const dir of toSync) {
        // syncBack's own error says what happened to HOST; no second "discarded" line for this dir.
        this.pendingSync.delete(dir);
        const report = await syncBack(dir, { progress: this.io.progress, warn: this.io.log, signal: this.signal });
        if (this.io.verbose) this.io.log(`--add-dir ${dir.spec.spec}: synced back ${report.filesWritten} files, deleted ${report.deleted}`);
      }
      if (toSync.length > 0) this.timings.mark('directories synced back');
    } catch (error) {
      throw this.guestDeadline.explain(error);
    }
  }

  /** Kills whatever still runs, removes the VM's directory, and says which changes were discarded. Idempotent. */
  release(): Promise<void> {
    this.released ??= (async () => {
      this.guestDeadline.disarm();
      await this.owned.release();
      await this.network?.close();
      for (const dir of this.pendingSync) this.io.log(`--add-dir ${dir.spec.spec}: guest changes discarded, ${dir.spec.hostPath} left as it was`);
    })();
    return this.released;
  }

  /** Unmounts rw directories so their images are complete and clean; one that fails to unmount is not synced back. */
  private async unmountForSync(): Promise<StagedDir[]> {
    const clean: StagedDir[] = [];
    for (const dir of this.pendingSync) {
      try {
        await this.session.unmount(dir.spec.guestPath);
        clean.push(dir);
      } catch (error) {
        this.io.log(`--add-dir ${dir.spec.spec}: the guest could not unmount it cleanly (${(error as Error).message})`);
      }
    }
    return clean;
  }
}

/** The guest's overall deadline, joined with the caller's signal: `signal` aborts on either. */
class GuestDeadline {
  private readonly controller = new AbortController();
  private timer: NodeJS.Timeout | undefined;
  readonly signal: AbortSignal;

  constructor(private readonly caller: AbortSignal) {
    this.signal = AbortSignal.any([caller, this.controller.signal]);
  }

  arm(limitMs: number): void {
    this.timer = setTimeout(() => {
      const seconds = Number((limitMs / 1000).toFixed(1));
      this.controller.abort(new MvmError(`the guest did not finish within ${seconds} s (boot timeout + --timeout + a margin); the VM was killed`, EXIT_TIMED_OUT));
    }, limitMs);
  }

  disarm(): void {
    clearTimeout(this.timer);
  }

  throwIfPassed(): void {
    this.controller.signal.throwIfAborted();
  }

  /** Whatever broke because of an abort (a closed session, a killed VM) is reported as the abort. */
  explain(error: unknown): unknown {
    if (this.caller.aborted) return this.caller.reason;
    if (this.controller.signal.aborted) return this.controller.signal.reason;
    return error;
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
async function fitDriveSlots(plan: RestorePlan, staged: readonly StagedDir[], backend: Backend, io: VmIo): Promise<RestorePlan | undefined> {
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
  timeoutMs: number,
): Promise<{ vm: RunningVm; session: AgentSession } | { error: string }> {
  let vm: RunningVm | undefined;
  const attempt = AbortSignal.any([signal, AbortSignal.timeout(timeoutMs)]);
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
    const session = await openAgentSession(vm, { signal: attempt, timeoutMs, guest: 'the restored guest' });
    return { vm, session };
  } catch (error) {
    await vm?.kill();
    if (signal.aborted) throw signal.reason;
    if (attempt.aborted) return { error: `the restore took longer than ${timeoutMs / 1000} s` };
    return { error: (error instanceof Error ? error.message : String(error)).replace(/\s*\n\s*/g, ' ') };
  }
}

async function emptySlot(runDir: string, index: number, bytes: number): Promise<string> {
  const path = join(runDir, `empty-slot${index}`);
  await writeFile(path, '');
  await truncate(path, bytes);
  return path;
}

class Timings {
  private readonly start = performance.now();
  private last = this.start;

  constructor(private readonly io: VmIo) {}

  mark(what: string): void {
    if (!this.io.verbose) return;
    const now = performance.now();
    this.io.log(`[timing] ${what}: +${((now - this.last) / 1000).toFixed(3)} s (${((now - this.start) / 1000).toFixed(3)} s total)`);
    this.last = now;
  }
}
