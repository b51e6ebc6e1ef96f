/** A Machine for the Firecracker test double's API server that records the calls it gets: unit tests drive the server without a VM. */
import type { Machine, MachineConfig, SnapshotLoad } from '../firecracker-double/machine.js';

export type Call = [string, ...unknown[]];

/** Records every call; `delayMs` makes each call slow enough for overlaps to show. */
export class FakeMachine implements Machine {
  readonly calls: Call[] = [];
  readonly ended = new Promise<void>(() => {});
  failWith: Error | undefined;
  delayMs = 0;
  private active = 0;
  maxActive = 0;

  private async record(...call: Call): Promise<void> {
    this.active++;
    this.maxActive = Math.max(this.maxActive, this.active);
    this.calls.push(call);
    await new Promise((resolve) => setTimeout(resolve, this.delayMs));
    this.active--;
    if (this.failWith) throw this.failWith;
  }

  start = (config: MachineConfig) => this.record('start', config);
  pause = () => this.record('pause');
  resume = () => this.record('resume');
  createSnapshot = (snapshotPath: string, memFilePath: string) => this.record('createSnapshot', snapshotPath, memFilePath);
  loadSnapshot = (load: SnapshotLoad) => this.record('loadSnapshot', load);
  updateDrive = (driveId: string, pathOnHost: string) => this.record('updateDrive', driveId, pathOnHost);
  sendCtrlAltDel = () => this.record('sendCtrlAltDel');
}
