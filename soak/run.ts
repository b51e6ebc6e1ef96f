// `npm run soak`: signals, output flood and protocol fuzzing at full length, one figure line each
// and a last line that counts the failed checks; exits 1 when any failed. Short versions of the same
// checks run in `npm test` (test/e2e/soak-short.test.ts, test/unit/fuzz-short.test.ts).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { flood, formatFlood } from './flood.js';
import { formatAgentFuzz, formatHostFuzz, fuzzAgent, fuzzHost } from './fuzz.js';
import { builtMvmctl } from './launch.js';
import { seededRandom } from './random.js';
import { formatSignalBatch, randomMoments, SIGNAL_CASES, signalBatch, signalProblems } from './signals.js';

const USAGE = `usage: npm run soak -- [--only signals|flood|fuzz] [--runs N] [--gib N] [--stall-seconds N]
       [--fuzz-inputs N] [--fuzz-seconds N] [--seed N] [--mvmctl PATH/TO/CLI.js]`;

const { values: flags } = parseArgs({
  options: {
    only: { type: 'string' },
    runs: { type: 'string', default: '50' },
    gib: { type: 'string', default: '10' },
    'stall-seconds': { type: 'string', default: '5' },
    'fuzz-inputs': { type: 'string', default: '1000000' },
    'fuzz-seconds': { type: 'string', default: '300' },
    seed: { type: 'string', default: String(Date.now() % 1_000_000) },
    mvmctl: { type: 'string' },
  },
});

function count(name: keyof typeof flags): number {
  const value = Number(flags[name]);
  if (!Number.isFinite(value) || value < 0) {
    console.error(`--${name} must be a non-negative number\n${USAGE}`);
    process.exit(2);
  }
  return value;
}

const only = flags.only;
if (only !== undefined && !['signals', 'flood', 'fuzz'].includes(only)) {
  console.error(USAGE);
  process.exit(2);
}
const selected = (part: string) => only === undefined || only === part;
const seed = count('seed');
const launch = builtMvmctl(flags.mvmctl);
const failed: string[] = [];
let checks = 0;
const report = (line: string, ok: boolean, details: string[] = []) => {
  checks++;
  console.log(line);
  for (const detail of details) console.log(detail);
  if (!ok) failed.push(line.split(':')[0]!);
};

/** A private MVM_STATE_DIR per batch, so leftovers are counted for that batch alone. */
async function withStateDir<T>(work: (env: NodeJS.ProcessEnv, stateDir: string) => Promise<T>): Promise<T> {
  const stateDir = mkdtempSync(join(tmpdir(), 'mvm-soak-state-'));
  try {
    return await work({ ...process.env, MVM_STATE_DIR: stateDir, MVM_NO_TCG_WARNING: '1' }, stateDir);
  } finally {
    rmSync(stateDir, { recursive: true, force: true });
  }
}

console.log(`soak: seed ${seed}`);
if (selected('signals')) {
  const rand = seededRandom(seed);
  for (const signal of SIGNAL_CASES) {
    const batch = await withStateDir((env, stateDir) =>
      signalBatch({ launch, signal, moments: randomMoments(rand, signal, count('runs')), env, stateDir }),
    );
    report(formatSignalBatch(batch), batch.ok, signalProblems(batch));
  }
}
if (selected('flood')) {
  const result = await withStateDir((env) =>
    flood({ launch, env, bytes: Math.round(count('gib') * 1024 ** 3), stallMs: count('stall-seconds') * 1000 }),
  );
  report(formatFlood(result), result.ok);
}
if (selected('fuzz')) {
  const host = await fuzzHost({ inputs: count('fuzz-inputs'), seed });
  report(formatHostFuzz(host), host.ok, host.crashMessages.map((m) => `  ${m.split('\n').slice(0, 4).join('\n    ')}`));
  const agent = await fuzzAgent(count('fuzz-seconds'));
  report(formatAgentFuzz(agent), agent.ok, agent.crashReport ? [agent.crashReport] : []);
}
console.log(`soak: ${checks} checks, ${failed.length} failed${failed.length ? ` (${failed.join(', ')})` : ''}`);
process.exit(failed.length ? 1 : 0);
