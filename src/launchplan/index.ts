export { ENV_KEY_PATTERN, ENV_KEY_RULE, isValidEnvKey, mergeEnv, parseEnvAssignment } from './env.js';
export { type LaunchPlan, loadLaunchPlan } from './load.js';
export { type CompileResult, compileManifest } from './compile.js';
