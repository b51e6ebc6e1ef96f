export { parseAddDirSpec, resolveAddDir, splitAddDirSpec, validateAddDirs, type AddDirParts, type AddDirSpec } from './spec.js';
export { discardStaged, stageAddDir, type StagedDir, type StageOptions } from './stage.js';
export { syncBack, type SyncReport, type SyncOptions } from './syncback.js';
export { recoverInterruptedSyncs } from './apply.js';
export { removeTree } from './host-ops.js';
export { imageIsClean, uncleanReason } from './ext4.js';
export { benchRoundTrip, type RoundTripBench } from './bench.js';
export { treeDigest, treeManifest } from './tree-manifest.js';
