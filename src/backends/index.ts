import { MvmError } from '../errors.js';
import { QemuBackend } from './qemu/index.js';
import type { Backend } from './types.js';

export type BackendChoice = 'auto' | 'qemu' | 'firecracker';
export const BACKEND_CHOICES: readonly BackendChoice[] = ['auto', 'qemu', 'firecracker'];

export function selectBackend(choice: BackendChoice): Backend {
  if (choice === 'firecracker') {
    throw new MvmError('the Firecracker backend is not available in this version of mvmctl: use --backend qemu (or auto)');
  }
  return new QemuBackend();
}

export type { Backend, BackendCapabilities, DriveSpec, GuestFailure, RunningVm, VmExit, VmSpec } from './types.js';
