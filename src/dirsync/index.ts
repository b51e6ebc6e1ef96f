export { parseAddDirSpec, validateAddDirs, type AddDirSpec } from './spec.js';
export { discardStaged, stageAddDir, type StagedDir, type StageOptions } from './stage.js';
export { syncBack, removeTree, type SyncReport, type SyncOptions } from './syncback.js';
export { imageIsClean, uncleanReason } from './ext4.js';
export { benchRoundTrip, type RoundTripBench } from './bench.js';
export { treeDigest, treeManifest } from './tree-manifest.js';
