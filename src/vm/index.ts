/**
 * The VM lifecycle pieces that exec and snapshot capture share: owning a VM (owned.ts), booting it
 * with the accelerator's fallback (boot.ts), opening its agent session (agent.ts), and what it
 * boots (image.ts).
 */
export { GuestFailedError, openAgentSession, type OpenAgentOptions } from './agent.js';
export { bootVm, planBootAccel, verdictKeyFor, type BootedVm, type BootOptions } from './boot.js';
export type { BootImage, RestorePlan, SnapshotChoice } from './image.js';
export { OwnedVm, TEMPLATE_MARKER_FILE, type OwnOptions } from './owned.js';
