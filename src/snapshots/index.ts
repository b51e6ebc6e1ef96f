/**
 * Snapshots of a booted guest waiting for its first command, restored instead of booting: for
 * templates and for the default image. See subject.ts (layout), capture.ts and decide.ts.
 */
export { captureSnapshot, removeSnapshotLeftovers, SnapshotBootError, type CaptureOptions } from './capture.js';
export { decideSnapshot, removeSnapshot, verifySnapshot, type SnapshotDecision, type SnapshotRequest } from './decide.js';
export { readSnapshotMeta, SNAPSHOT_LINK, SNAPSHOT_META_FILE, type SnapshotMeta, type SnapshotSubject } from './subject.js';
