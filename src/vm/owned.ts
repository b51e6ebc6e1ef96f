/**
 * A VM this process owns: its private directory and record in the registry (so `ls`/`down` see it
 * and the reaper cleans up after a killed mvmctl), the VMM it starts there, and its teardown. Exec
 * and snapshot capture both run their VMs through it.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Backend, RunningVm, VmSpec } from '../backends/types.js';
import { createVmDir, newVmName, ownVmRecord, recordVmm, removeVmDir, writeVmRecord, type VmRecord } from '../state/registry.js';

/** Name of the file in a VM's directory naming the template directory it runs from. */
export const TEMPLATE_MARKER_FILE = 'template';

export interface OwnOptions {
  /** What `ls` shows as its command. */
  command: string[];
  /** The template directory it runs from, so that `template rm` sees it is in use. */
  templateDir?: string;
  /** Called as each VMM starts (for -v timings). */
  onVmmStarted?: (vm: RunningVm) => void;
  /** The VM's name: one the user gave it (checkVmName), else a generated exec-… name. */
  name?: string;
}

export class OwnedVm {
  private vms: RunningVm[] = [];

  private constructor(
    readonly backend: Backend,
    readonly name: string,
    readonly runDir: string,
    private readonly record: VmRecord,
    private readonly onVmmStarted?: (vm: RunningVm) => void,
  ) {}

  /** Creates the VM's directory and record; nothing runs yet. */
  static async create(backend: Backend, options: OwnOptions): Promise<OwnedVm> {
    const name = options.name ?? newVmName();
    const runDir = await createVmDir(name);
    try {
      const record = ownVmRecord({ name, backend: backend.name, command: options.command, runDir });
      await writeVmRecord(record);
      if (options.templateDir) await writeFile(join(runDir, TEMPLATE_MARKER_FILE), options.templateDir + '\n');
      return new OwnedVm(backend, name, runDir, record, options.onVmmStarted);
    } catch (error) {
      await removeVmDir(runDir);
      throw error;
    }
  }

  /**
   * Starts a VMM for this VM (a boot, or a restore) and records its pid. A VM may see more than
   * one start (a TCG boot after KVM failed, a cold boot after a failed restore); the caller kills
   * a VMM it gives up on.
   */
  async start(spec: Omit<VmSpec, 'name' | 'runDir'>, signal: AbortSignal): Promise<RunningVm> {
    const vm = await this.backend.start({ ...spec, name: this.name, runDir: this.runDir }, signal);
    this.vms.push(vm);
    try {
      await recordVmm(this.record, vm.vmmPid);
      this.onVmmStarted?.(vm);
    } catch (error) {
      await vm.kill();
      throw error;
    }
    return vm;
  }

  /** Kills every VMM it started and removes its directory. Idempotent. */
  async release(): Promise<void> {
    await Promise.all(this.vms.map((vm) => vm.kill()));
    await removeVmDir(this.runDir);
  }
}
