/**
 * `MicroVm.start(options)`: a microVM that stays up for any number of commands, as E2B's and
 * Vercel's sandboxes do, owned by this process (it dies with it). `await using vm = await
 * MicroVm.start()` stops it at the end of the block.
 */
import { LiveVm } from '../exec/microvm.js';
import { MvmError } from '../errors.js';
import { silentProgress } from '../progress.js';
import { commandHandle, commandIo, execResult, type ExecHandle } from './exec.js';
import { qemuProvider, resolveCommand, resolveVm, type CommandOptions, type VmOptions, type VmProvider } from './options.js';

export class MicroVm implements AsyncDisposable {
  /** Aborted by stop(): ends a command that is still running. */
  private readonly stopping = new AbortController();
  private running: Promise<unknown> = Promise.resolve();
  private stopped?: Promise<void>;
  private readonly gone: Promise<void>;
  private markGone!: () => void;

  private constructor(
    private readonly live: LiveVm,
    private readonly log: (line: string) => void,
  ) {
    this.gone = new Promise<void>((resolve) => (this.markGone = resolve));
    void live.failed.then(() => this.markGone());
  }

  /**
   * Boots a VM (restoring the image's or template's snapshot where one fits). Rejects with an
   * MvmError (bad options, a failed boot), or with `options.signal`'s reason when it aborts first;
   * aborting it later tears the VM down.
   */
  static start(options: VmOptions = {}): Promise<MicroVm> {
    return MicroVm.startWith(qemuProvider, options);
  }

  /** @internal The same over another VmProvider (tests). */
  static async startWith(provider: VmProvider, options: VmOptions = {}): Promise<MicroVm> {
    const signal = options.signal ?? new AbortController().signal;
    signal.throwIfAborted();
    const log = options.onWarning ?? (() => {});
    const { request, deps } = await resolveVm(options, provider, log);
    signal.throwIfAborted();
    const io = { log, verbose: options.verbose ?? false, progress: options.onProgress ?? silentProgress };
    const live = await LiveVm.start({ ...request, label: options.label ?? ['(MicroVm.start)'] }, io, deps, signal);
    const vm = new MicroVm(live, log);
    // Aborting the start signal later tears the VM down, as it does for exec.
    signal.addEventListener('abort', () => void vm.stop().catch(() => {}), { once: true });
    return vm;
  }

  /** The VM's name, as `mvmctl ls` shows it. */
  get name(): string {
    return this.live.name;
  }

  /** Settles once the VM is gone: stopped, or failed under its commands (its VMM exited). */
  get closed(): Promise<void> {
    return this.gone;
  }

  /**
   * Runs `argv` in the VM: the handle is exec()'s. Commands run one after another in the order
   * they were given; each sees what the ones before it left in the guest.
   */
  exec(argv: readonly string[], options: CommandOptions = {}): ExecHandle {
    const calledAt = performance.now();
    return commandHandle(options.stdin ?? false, async (streams) => {
      const request = resolveCommand(argv, options);
      const onStarted = () => options.onStarted?.({ name: this.name, timings: { commandStartedMs: performance.now() - calledAt } });
      const turn = this.running.then(async () => {
        if (this.stopped) throw new MvmError(`${this.name} is stopped`);
        const signals = [this.stopping.signal, ...(options.signal ? [options.signal] : [])];
        return this.live.run(request, commandIo(streams, options.onWarning ?? this.log, onStarted), AbortSignal.any(signals));
      });
      this.running = turn.catch(() => {});
      return execResult(await turn);
    });
  }

  /**
   * Stops the VM: a command still running is killed, rw directories are synced back to the host,
   * the VM is powered off and its state removed. Idempotent.
   */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      this.stopping.abort(new MvmError(`${this.name} was stopped`));
      await this.running;
      try {
        await this.live.stop({ sync: true });
      } finally {
        await this.live.release();
        this.markGone();
      }
    })();
    return this.stopped;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}
